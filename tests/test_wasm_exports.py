"""The built filter exports only the proxy-wasm callbacks it uses.

Envoy (proxy-wasm-cpp-host) enters the VM for a callback only when the
module exports it; the Rust SDK exports all of them, so `make build` drops
the ones the filter does not use (tools/wasm-trim). Were `proxy_on_log`
exported again, every request would pay a VM entry for nothing; were
`proxy_on_delete` dropped, every request would leak its context. The other
integration tests prove the kept set is enough (login bodies, answers,
scorer callouts, the tick).
"""

from harness import WASM

# tools/wasm-trim/src/main.rs `KEEP`, and why each one is kept.
KEPT = {
    "proxy_on_context_create", "proxy_on_configure", "proxy_on_tick", "proxy_on_request_headers",
    "proxy_on_request_body", "proxy_on_response_headers", "proxy_on_http_call_response", "proxy_on_delete",
    "proxy_on_memory_allocate",
}


def leb128(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, at


def exports(wasm: bytes) -> dict[str, int]:
    """Export names and kinds (0 function, 1 table, 2 memory, 3 global)."""
    assert wasm[:4] == b"\0asm", "not a wasm module"
    at = 8
    while at < len(wasm):
        section, at = wasm[at], at + 1
        size, at = leb128(wasm, at)
        if section == 7:
            out = {}
            count, p = leb128(wasm, at)
            for _ in range(count):
                length, p = leb128(wasm, p)
                name = wasm[p:p + length].decode()
                kind = wasm[p + length]
                _, p = leb128(wasm, p + length + 1)
                out[name] = kind
            return out
        at += size
    return {}


def test_only_the_callbacks_the_filter_uses_are_exported():
    found = exports(WASM.read_bytes())
    callbacks = {name for name, kind in found.items() if kind == 0 and name.startswith("proxy_on_")}
    assert callbacks == KEPT, f"dropped too much: {KEPT - callbacks}; kept too much: {callbacks - KEPT} (make build trims)"
    # The ABI version and the memory the host reads stay.
    assert "proxy_abi_version_0_2_1" in found and found.get("memory") == 2
