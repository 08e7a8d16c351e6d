"""Writes the fuzz targets' seed corpora (fuzz/seeds/<target>/) from what the
tests use: the shipped and test configurations, the identities, login
bodies, scorer answers and requests of the unit and integration tests.
Run from the repository root: python3 fuzz/make_seeds.py (the output is
committed; libFuzzer's own finds go to fuzz/corpus/, which is not)."""

import base64
import hashlib
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SEEDS = ROOT / "fuzz" / "seeds"
SEP = b"\xff"


def shipped_config() -> str:
    text = (ROOT / "envoy" / "envoy.yaml").read_text()
    m = re.search(r"value: \|\n((?:\s{14,}.*\n)+)", text)
    return m.group(1) if m else "{}"


def configs() -> list[bytes]:
    out = [shipped_config().encode()]
    # JSON configurations written inline in the engine's tests.
    for path in sorted((ROOT / "engine" / "src").rglob("*.rs")):
        for m in re.finditer(r'r#"(\{.*?\})"#', path.read_text(), re.S):
            if '"mode"' in m.group(1) or '"rate"' in m.group(1) or '"state"' in m.group(1):
                out.append(m.group(1).encode())
    out.append((ROOT / "fuzz" / "fuzz_targets" / "common.rs").read_text().split('r#"')[1].split('"#')[0].encode())
    return out


def identities() -> list[bytes]:
    return [
        SEP.join([b"127.0.0.1:5", b"198.51.100.7, 10.0.0.1", b"key-123", b"session=abc; theme=dark",
                  b"Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1c2VyMDAwMSJ9.c2ln"]),
        SEP.join([b"[2001:db8::1]:443", b"2001:db8:0:1::7", b"", b"a=1;session=\"q\"", b"Bearer a.b.c"]),
        SEP.join([b"10.0.0.1:80", b"unknown, 203.0.113.9,198.51.100.1", b"x" * 300, b"session=", b"Basic dXNlcjpwdw=="]),
        SEP.join([b"garbage", b",,,", b"", b";;;", b"Bearer ..."]),
    ]


def login_bodies() -> list[bytes]:
    return [
        b'{"username":"user0001","password":"pass-0001"}',
        b'{"username":" Alice ","password":"x"}',
        b'{"username":42,"password":null}',
        b"username=Bob%40x.com&password=1",
        b"username=&password=",
        b'{"user":{"nested":true}}',
        b"  {\"username\": \"\\u00e9t\\u00e9\"}",
    ]


def shard_values() -> list[bytes]:
    header = b"ABSH" + (5).to_bytes(2, "little") + b"\0\0" + (1).to_bytes(4, "little") + (8).to_bytes(4, "little")
    record = (0x0102030405060708).to_bytes(8, "little") + (1000).to_bytes(8, "little") * 2 + (10**13).to_bytes(8, "little")
    record = record.ljust(332, b"\0")
    shard = header + record + b"\0" * (332 * 7)
    manifest = json.dumps({"shards": 2, "slots": 8, "record_bytes": 332, "fingerprint": 1, "format": 5,
                           "fields": ["api/10s", "*/60s"]}).encode()
    return [
        SEP.join([record, shard, manifest, b"\x08\x07\x06\x05\x04\x03\x02\x01"]),
        SEP.join([b"", header, b"{}", b""]),
        SEP.join([record[:40], shard[:100], manifest[:30], b"\x01"]),
    ]


def scorer_answers() -> list[bytes]:
    return [
        b'{"version":1,"score":80.0,"action":"block","reasons":["credential_stuffing"],"ttl_s":60}',
        b'{"version":1,"score":10.0,"action":"allow","reasons":[],"ttl_s":30}',
        json.dumps({"version": 1, "next": 7, "verdicts": [
            {"client": "198.51.100.7", "reasons": ["rate_limit"], "until_ms": 1_800_000_000_000},
            {"client": "2001:db8::1#0a0b0c0d", "reasons": ["probing"], "until_ms": 1_800_000_000_000}]}).encode(),
        json.dumps({"version": 1, "next": 1,
                    "known_shards": [{"index": 3, "bits": base64.b64encode(b"\x01" * 1024).decode()}],
                    "baselines": [{"name": "login:/api/login", "baseline": 0.2, "samples": 40,
                                   "unknown_baseline": 0.1}]}).encode(),
        b'{"version":2}',
    ]


def scorer_inputs() -> list[bytes]:
    return [
        json.dumps({"version": 1, "client": "198.51.100.7", "risk": 60.0, "reasons": ["rate_limit"],
                    "features": {}}).encode(),
        json.dumps({"version": 1, "known_accounts": ["a" * 16], "baselines": [
            {"name": "group:api", "baseline": 3.0, "samples": 10, "unknown_baseline": 0.0}]}).encode(),
        b'{"version":1,"client":"x y","reasons":["Bad Name"]}',
    ]


def main():
    targets = {
        "config": configs(),
        "identity": identities(),
        "login_body": login_bodies(),
        "shard_codec": shard_values(),
        "scorer_answer": scorer_answers(),
        "scorer_input": scorer_inputs(),
    }
    for target, seeds in targets.items():
        d = SEEDS / target
        d.mkdir(parents=True, exist_ok=True)
        for old in d.iterdir():
            old.unlink()
        for seed in seeds:
            (d / hashlib.sha1(seed).hexdigest()[:16]).write_bytes(seed)
        print(f"{target}: {len(seeds)} seeds")


if __name__ == "__main__":
    main()
