"""`make oci`: the filter as an Istio-loadable OCI image, built without
Docker. Deterministic (a rebuild gives the same manifest digest), and the
.wasm comes back byte for byte when extracted by Istio's rules; pushed with
skopeo to a real registry (Debian's docker-registry) on loopback and pulled
back, the manifest digest — the WasmPlugin's sha256 — is unchanged."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from harness import ROOT, WASM, free_port, request, wait_until

sys.path.insert(0, str(ROOT / "deploy" / "oci"))
import build_oci  # noqa: E402


def test_rebuild_gives_the_same_digest_and_istio_gets_the_wasm_back(tmp_path):
    first = build_oci.build(WASM, tmp_path / "a", "0.1.0")
    second = build_oci.build(WASM, tmp_path / "b", "0.1.0")
    assert first == second
    for name in ("index.json", "oci-layout"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert build_oci.extract_like_istio(tmp_path / "a", "0.1.0") == WASM.read_bytes()

    layout = tmp_path / "a"
    index = json.loads((layout / "index.json").read_text())
    manifest_blob = (layout / "blobs/sha256" / index["manifests"][0]["digest"].removeprefix("sha256:")).read_bytes()
    assert "sha256:" + hashlib.sha256(manifest_blob).hexdigest() == first
    manifest = json.loads(manifest_blob)
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert manifest["annotations"]["module.wasm.image/variant"] == "compat"
    assert [l["mediaType"] for l in manifest["layers"]] == ["application/vnd.oci.image.layer.v1.tar+gzip"]
    layer = (layout / "blobs/sha256" / manifest["layers"][0]["digest"].removeprefix("sha256:")).read_bytes()
    assert layer[4:8] == b"\0\0\0\0", "gzip header mtime must be 0"
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer))) as tar:
        members = tar.getmembers()
    assert [(m.name, m.mtime, m.uid, m.gid, m.mode) for m in members] == [("plugin.wasm", 0, 0, 0, 0o644)]

    # Another .wasm gives another digest; a digest follows the bytes only.
    other = tmp_path / "other.wasm"
    other.write_bytes(WASM.read_bytes() + b"\0")
    assert build_oci.build(other, tmp_path / "c", "0.1.0") != first


def test_make_oci_prints_the_wasmplugin_sha256(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "deploy/oci/build_oci.py"), "--out", str(tmp_path / "img")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    digest = build_oci.build(WASM, tmp_path / "again")
    assert f"WasmPlugin sha256: {digest.removeprefix('sha256:')}" in out.stdout
    assert "skopeo copy oci:" in out.stdout


def test_push_to_a_registry_and_back_keeps_the_digest(tmp_path):
    skopeo, registry = shutil.which("skopeo"), shutil.which("docker-registry")
    if not (skopeo and registry):
        pytest.skip("skopeo and docker-registry (Debian packages) are needed for the push round trip")
    digest = build_oci.build(WASM, tmp_path / "layout", "0.1.0")
    port = free_port()
    config = tmp_path / "registry.yml"
    config.write_text(f"""version: 0.1
log: {{level: error}}
storage: {{filesystem: {{rootdirectory: {tmp_path / 'storage'}}}}}
http: {{addr: 127.0.0.1:{port}}}
""")
    proc = subprocess.Popen([registry, "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def up():
            try:
                return request(port, "GET", "/v2/").status == 200
            except OSError:
                return False

        wait_until(up, 20, 0.1, "docker-registry")
        ref = f"docker://127.0.0.1:{port}/abuse-filter:0.1.0"
        common = ["--insecure-policy"]
        push = subprocess.run([skopeo, *common, "copy", "--dest-tls-verify=false", f"oci:{tmp_path / 'layout'}:0.1.0", ref],
                              capture_output=True, text=True, timeout=120)
        assert push.returncode == 0, push.stderr
        raw = subprocess.run([skopeo, *common, "inspect", "--tls-verify=false", "--raw", ref],
                             capture_output=True, timeout=60)
        assert raw.returncode == 0, raw.stderr
        assert "sha256:" + hashlib.sha256(raw.stdout).hexdigest() == digest
        pull = subprocess.run([skopeo, *common, "copy", "--src-tls-verify=false", ref, f"oci:{tmp_path / 'pulled'}:0.1.0"],
                              capture_output=True, text=True, timeout=120)
        assert pull.returncode == 0, pull.stderr
        assert build_oci.extract_like_istio(tmp_path / "pulled", "0.1.0") == WASM.read_bytes()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
