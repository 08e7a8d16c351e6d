"""CrowdSec as a peer: replay the run's nginx-combined access log through
the Debian package's crowdsec (stock nginx parser, base HTTP scenarios from
the offline hub it ships), in time-machine mode, with a private config so
nothing touches /etc/crowdsec's database or port 8080; then count, per
scenario, the client addresses it raised alerts on.

Offline install (Debian 12): CrowdSec's postinst registers with the Central
API unless /etc/crowdsec/online_api_credentials.yaml exists and is NOT
empty, so: write a comment line to it first, then apt-get install crowdsec
(or `dpkg --configure crowdsec` after a failed install). The package then
enables the offline hub (symlinks to /usr/share/crowdsec/hub) with the
nginx collection and base-http-scenarios."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

ETC = Path("/etc/crowdsec")
ALERT = re.compile(r"\) (\S+) by ip (\S+) :")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unavailable(reason: str) -> dict:
    return {"available": False, "reason": reason}


# CrowdSec 1.4.6 replays about 220 lines/s on this machine: allow ~100/s.
REPLAY_LINES_PER_S = 100


def replay(log: Path, out_dir: Path, timeout_s: float | None = None) -> dict:
    """{available, alerts, flagged: {address: [crowdsec scenarios]}} or {available: False, reason}.
    The time allowed grows with the log (a flood the filter answers fast
    leaves tens of thousands of lines)."""
    if timeout_s is None:
        with open(log, "rb") as f:
            lines = sum(1 for _ in f)
        timeout_s = max(240.0, lines / REPLAY_LINES_PER_S)
    for binary in ("crowdsec", "cscli"):
        if not shutil.which(binary):
            return unavailable(f"{binary} not installed (Debian: apt-get install crowdsec; see eval/README.md)")
    if not (ETC / "config.yaml").exists():
        return unavailable("/etc/crowdsec/config.yaml missing (package not configured)")
    parsers = ETC / "parsers" / "s01-parse" / "nginx-logs.yaml"
    scenarios = sorted(p.stem for p in (ETC / "scenarios").glob("http-*.yaml"))
    if not parsers.exists() or not scenarios:
        return unavailable("the nginx parser or the base HTTP scenarios are not enabled in /etc/crowdsec")
    try:
        import yaml
    except ImportError:
        return unavailable("PyYAML missing in the venv")
    work = out_dir / "crowdsec"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    port = _free_port()
    cfg = yaml.safe_load((ETC / "config.yaml").read_text())
    cfg["common"].update(daemonize=False, log_media="stdout", log_level="info")
    cfg["common"].pop("log_dir", None)
    cfg["db_config"]["db_path"] = str(work / "crowdsec.db")
    cfg["db_config"]["use_wal"] = False
    cfg["api"]["server"]["listen_uri"] = f"127.0.0.1:{port}"
    cfg["api"]["server"].pop("online_client", None)
    cfg["api"]["client"]["credentials_path"] = str(work / "local_api_credentials.yaml")
    cfg.setdefault("prometheus", {})["enabled"] = False
    cfg["crowdsec_service"]["acquisition_path"] = str(work / "acquis.yaml")
    cfg["crowdsec_service"].pop("acquisition_dir", None)
    (work / "config.yaml").write_text(json.dumps(cfg, indent=1))  # JSON is YAML
    (work / "acquis.yaml").write_text(json.dumps({"filenames": [str(work / "none.log")], "labels": {"type": "nginx"}}))
    v = subprocess.run(["cscli", "version"], capture_output=True, text=True)
    m = re.search(r"version: (\S+)", v.stdout + v.stderr)
    version = f"crowdsec {m.group(1)}" if m else "crowdsec"
    add = subprocess.run(["cscli", "-c", str(work / "config.yaml"), "machines", "add", "eval-replay", "--force",
                          "--password", "eval-replay-password-0123456789", "-f", str(work / "local_api_credentials.yaml"),
                          "--url", f"http://127.0.0.1:{port}"], capture_output=True, text=True, timeout=60)
    if add.returncode != 0:
        return unavailable(f"cscli machines add failed: {add.stderr.strip()[-300:]}")
    started = time.monotonic()
    with open(work / "crowdsec.log", "w") as out:
        try:
            proc = subprocess.run(["crowdsec", "-c", str(work / "config.yaml"), "-dsn", f"file://{log.resolve()}",
                                   "-type", "nginx", "-no-capi"], stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return unavailable(f"replay did not finish in {timeout_s:.0f} s")
    elapsed = round(time.monotonic() - started, 1)
    text = (work / "crowdsec.log").read_text(errors="replace")
    flagged: dict[str, set] = {}
    alerts = 0
    for m in ALERT.finditer(text):
        alerts += 1
        flagged.setdefault(m.group(2), set()).add(m.group(1))
    if proc.returncode != 0 and not alerts:
        return unavailable(f"crowdsec exited {proc.returncode}: {text.strip()[-300:]}")
    return {"available": True, "version": version, "alerts": alerts,
            "elapsed_s": elapsed, "scenarios_loaded": scenarios,
            "flagged": {ip: sorted(s) for ip, s in sorted(flagged.items())}}


def per_scenario(result: dict, addresses: dict[str, list[str]]) -> dict:
    """addresses: scenario -> its client addresses."""
    flagged = result.get("flagged", {})
    out = {}
    for name, addrs in addresses.items():
        hit = [a for a in addrs if a in flagged]
        out[name] = {"addresses": len(addrs), "flagged": len(hit),
                     "crowdsec_scenarios": sorted({s for a in hit for s in flagged[a]})}
    return out
