#!/usr/bin/env python3
"""`make oci`: the filter as an OCI image that Istio's Wasm fetcher accepts,
built without Docker, deterministically.

Layout (an OCI image layout directory, default target/oci/abuse-filter, tag
= the crate version): one manifest, media type
application/vnd.oci.image.manifest.v1+json, annotated
`module.wasm.image/variant: compat`, whose single layer
(application/vnd.oci.image.layer.v1.tar+gzip) is a tar holding only
`plugin.wasm` — the "compat" variant of the Wasm image spec. Istio takes the
last layer of the image and the first tar entry named plugin.wasm
(pkg/wasm/imagefetcher.go). Deterministic: tar entry mtime 0, uid/gid 0,
mode 0644, gzip header mtime 0 and no file name, a fixed config and fixed
annotations, JSON with sorted keys — the same .wasm always gives the same
manifest digest, the value of the WasmPlugin's `sha256`.

Push it with skopeo (no Docker needed):
  skopeo copy oci:target/oci/abuse-filter:0.1.0 docker://REGISTRY/abuse-filter:0.1.0
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import re
import shutil
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
WASM = ROOT / "target" / "wasm32-wasip1" / "release" / "abuse_filter.wasm"
OUT = ROOT / "target" / "oci" / "abuse-filter"

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
VARIANT_ANNOTATION = "module.wasm.image/variant"


def crate_version() -> str:
    text = (ROOT / "Cargo.toml").read_text()
    m = re.search(r'^\[workspace\.package\][^\[]*?^version\s*=\s*"([^"]+)"', text, re.M | re.S)
    return m.group(1) if m else "0.0.0"


def canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def layer_tar(wasm: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("plugin.wasm")
        info.size, info.mtime, info.mode = len(wasm), 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        tar.addfile(info, io.BytesIO(wasm))
    return buf.getvalue()


def gzip_bytes(data: bytes) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(data)
    return buf.getvalue()


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def build(wasm_path: Path = WASM, out: Path = OUT, tag: str | None = None) -> str:
    """Writes the layout to `out` (replacing it) and returns the manifest digest."""
    tag = tag or crate_version()
    wasm = wasm_path.read_bytes()
    if not wasm.startswith(b"\0asm"):
        raise ValueError(f"{wasm_path} is not a wasm module")
    tar = layer_tar(wasm)
    layer = gzip_bytes(tar)
    config = canonical({
        "architecture": "wasm",
        "os": "wasip1",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [digest(tar)]},
    })
    manifest = canonical({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": digest(config), "size": len(config)},
        "layers": [{"mediaType": LAYER_TYPE, "digest": digest(layer), "size": len(layer),
                    "annotations": {"org.opencontainers.image.title": "plugin.wasm"}}],
        "annotations": {
            VARIANT_ANNOTATION: "compat",
            "org.opencontainers.image.title": "abuse-filter",
            "org.opencontainers.image.description": "API abuse prevention filter for Envoy (proxy-wasm)",
            "org.opencontainers.image.version": tag,
            "org.opencontainers.image.licenses": "Apache-2.0",
        },
    })
    index = canonical({
        "schemaVersion": 2,
        "mediaType": INDEX_TYPE,
        "manifests": [{"mediaType": MANIFEST_TYPE, "digest": digest(manifest), "size": len(manifest),
                       "annotations": {"org.opencontainers.image.ref.name": tag}}],
    })
    if out.exists():
        shutil.rmtree(out)
    blobs = out / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    for blob in (layer, config, manifest):
        (blobs / hashlib.sha256(blob).hexdigest()).write_bytes(blob)
    (out / "oci-layout").write_bytes(canonical({"imageLayoutVersion": "1.0.0"}))
    (out / "index.json").write_bytes(index)
    return digest(manifest)


def extract_like_istio(layout: Path, tag: str | None = None) -> bytes:
    """The .wasm as Istio's fetcher finds it: the manifest (by tag), its last
    layer, which must be an OCI tar+gzip layer, the first tar entry whose
    base name is plugin.wasm. Checks every blob against its digest."""
    def blob(d: str) -> bytes:
        data = (layout / "blobs" / "sha256" / d.removeprefix("sha256:")).read_bytes()
        if digest(data) != d:
            raise ValueError(f"blob {d} does not match its digest")
        return data

    index = json.loads((layout / "index.json").read_text())
    entries = [m for m in index["manifests"] if tag is None or m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag]
    manifest = json.loads(blob(entries[0]["digest"]))
    layer = manifest["layers"][-1]
    if layer["mediaType"] != LAYER_TYPE:
        raise ValueError(f"last layer is {layer['mediaType']}, not {LAYER_TYPE}")
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob(layer["digest"]))), mode="r:") as tar:
        for member in tar:
            if Path(member.name).name == "plugin.wasm":
                return tar.extractfile(member).read()
    raise ValueError("plugin.wasm not found in the last layer")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--wasm", type=Path, default=WASM)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--tag", default=None, help="default: the crate version")
    args = p.parse_args()
    tag = args.tag or crate_version()
    d = build(args.wasm, args.out, tag)
    rel = args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out
    print(f"OCI image layout: {rel} (tag {tag}, compat variant, plugin.wasm {args.wasm.stat().st_size} bytes)")
    print(f"manifest digest:  {d}")
    print(f"WasmPlugin sha256: {d.removeprefix('sha256:')}")
    print(f"push:             skopeo copy oci:{rel}:{tag} docker://REGISTRY/abuse-filter:{tag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
