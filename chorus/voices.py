"""`chorus voices add FILE --name N`: upload a reference clip to a running gateway; prints the profile id.
`chorus voices list`: the caller's profiles, the catalog voices of the running TTS workers, and which
voice kinds a session can use now.

Cloning someone's voice needs their consent: `--i-have-consent` says so, otherwise the command asks
(and refuses when it cannot ask: no terminal).
"""

from __future__ import annotations

import argparse
import os
import sys

import httpx

CONSENT_QUESTION = (
    "Cloning a voice needs the speaker's consent. Does the person speaking in {file} agree to have "
    "their voice cloned? [y/N] "
)


def _consented(args: argparse.Namespace) -> bool:
    if args.i_have_consent:
        return True
    if not sys.stdin.isatty():
        print("error: pass --i-have-consent to confirm the speaker agreed to be cloned", file=sys.stderr)
        return False
    return input(CONSENT_QUESTION.format(file=args.file)).strip().lower() in ("y", "yes")


def add_voice(args: argparse.Namespace) -> int:
    if not args.file.is_file():
        print(f"error: no such file {args.file}", file=sys.stderr)
        return 2
    if not _consented(args):
        return 2
    api_key = args.api_key or os.environ.get("CHORUS_API_KEY")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with open(args.file, "rb") as clip, httpx.Client(base_url=args.url, timeout=120) as http:
            response = http.post(
                "/v1/voices",
                files={"file": (args.file.name, clip, "application/octet-stream")},
                data={"name": args.name, "consent": "true"},
                headers=headers,
            )
    except httpx.HTTPError as exc:
        print(f"error: cannot reach the gateway at {args.url}: {exc}", file=sys.stderr)
        return 1
    if response.status_code != 201:
        print(f"error: {response.status_code}: {_reason(response)}", file=sys.stderr)
        return 1
    profile = response.json()
    print(profile["id"])
    print(
        f"added {profile['name']!r}: {profile['duration_s']:.1f} s clip; use voice={profile['voice']}",
        file=sys.stderr,
    )
    return 0


def list_voices(args: argparse.Namespace) -> int:
    api_key = args.api_key or os.environ.get("CHORUS_API_KEY")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with httpx.Client(base_url=args.url, timeout=30) as http:
            response = http.get("/v1/voices", headers=headers)
    except httpx.HTTPError as exc:
        print(f"error: cannot reach the gateway at {args.url}: {exc}", file=sys.stderr)
        return 1
    if response.status_code != 200:
        print(f"error: {response.status_code}: {_reason(response)}", file=sys.stderr)
        return 1
    body = response.json()
    print(f"voice kinds available now: {', '.join(body.get('voice_kinds', []))}")
    for profile in body["items"]:
        print(f"{profile['voice']}\t{profile['name']} (cloned, {profile['duration_s']:.1f} s clip)")
    for voice in body.get("catalog", []):
        print(f"{voice['voice']}\t{voice['language']} catalog voice ({voice['source']})")
    return 0


def _reason(response: httpx.Response) -> str:
    try:
        return str(response.json().get("detail", response.text))
    except ValueError:
        return response.text
