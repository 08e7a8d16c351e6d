"""Attacks and the crawler driven by real external tools: ffuf (stuffing,
sequential BOLA, forced browsing), hydra (password spraying), wrk (L7
flood), wget (declared Googlebot). Each request carries the label header
and its X-Forwarded-For; the metrics come from Envoy's access log, never
from the tools' own output (it goes to target/eval/tools/*.log)."""

from __future__ import annotations

import asyncio
import json
import shutil

from bootstrap import LABEL_HEADER
from scenario import Ctx, Scenario

STUFFING_ADDRESS = "203.0.113.11"
SPRAY_ADDRESS = "203.0.113.21"
BOLA_SEQ_ADDRESS = "203.0.113.31"
SCAN_ADDRESS = "203.0.113.41"
FLOOD_ADDRESS = "203.0.113.61"
GOOGLEBOT_ADDRESS = "66.249.66.1"
GOOGLEBOT_UA = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
DESKTOP_UA = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36"

SENSITIVE_PATHS = [
    ".env", ".git/config", ".git/HEAD", "admin", "backup.zip", "wp-login.php", "wp-admin/", "phpmyadmin/",
    "config.php", ".htaccess", ".htpasswd", "server-status", "backup.sql", "dump.sql", "db.sql", ".aws/credentials",
    ".ssh/id_rsa", "actuator/env", "actuator/health", "cgi-bin/test.cgi", "web.config", ".DS_Store", "xmlrpc.php",
    "index.php.bak", "config.yml", "old/", "test/", "dev/", "api2/", "private/", "debug/", "console/", "secret/",
    "tmp/", "logs/", "internal/", "staging/", "uploads/", "export/", "api/v0/", "api/admin", "api/debug",
    "swagger.json", "graphql", "metrics", "server-info", "composer.json", "package.json", ".svn/entries",
    "etc/passwd", "robots.txt", "sitemap.xml", "login", "signin", "administrator/", "manager/html",
]


def available(binary: str) -> bool:
    return shutil.which(binary) is not None


async def run_tool(ctx: Ctx, name: str, argv: list[str], start: float, limit_s: float):
    """Runs one tool from `start` (s after the run start), killed after
    `limit_s`; its output goes to tools/<name>.log."""
    tools_dir = ctx.out_dir / "tools"
    tools_dir.mkdir(parents=True, exist_ok=True)
    await ctx.at(start)
    limit_s = max(1.0, min(limit_s, ctx.left() - 1))
    with open(tools_dir / f"{name}.log", "w") as log:
        log.write("$ " + " ".join(json.dumps(a) if " " in a else a for a in argv) + "\n")
        log.flush()
        proc = await asyncio.create_subprocess_exec(*argv, stdout=log, stderr=asyncio.subprocess.STDOUT,
                                                    stdin=asyncio.subprocess.DEVNULL, cwd=tools_dir)
        try:
            await asyncio.wait_for(proc.wait(), limit_s + 5)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
        ctx.notes.setdefault(name, f"exit {proc.returncode}")


def url(ctx: Ctx, path: str) -> str:
    return f"http://127.0.0.1:{ctx.port}{path}"


def label(scenario: str, client: str) -> str:
    return f"{LABEL_HEADER}: {scenario}/{client}"


async def ffuf_stuffing(ctx: Ctx):
    """Single-source credential stuffing: ffuf, JSON body, a combo list
    (pitchfork: users.txt x passwords.txt line by line), 4 threads."""
    from attacks import combo_list
    combos = combo_list(ctx.rng("ffuf_stuffing"), 300)
    d = ctx.out_dir / "tools"
    d.mkdir(parents=True, exist_ok=True)
    (d / "stuffing-users.txt").write_text("\n".join(u for u, _ in combos) + "\n")
    (d / "stuffing-passwords.txt").write_text("\n".join(p for _, p in combos) + "\n")
    limit = max(5.0, ctx.duration - ctx.attack_start - 6)
    await run_tool(ctx, "single_source_stuffing", [
        "ffuf", "-s", "-mc", "all", "-t", "4", "-p", "0.1", "-maxtime", str(int(limit)),
        "-mode", "pitchfork", "-w", str(d / "stuffing-users.txt") + ":USER", "-w", str(d / "stuffing-passwords.txt") + ":PASS",
        "-X", "POST", "-u", url(ctx, "/api/login"),
        "-H", "Content-Type: application/json", "-H", f"X-Forwarded-For: {STUFFING_ADDRESS}",
        "-H", f"User-Agent: {DESKTOP_UA}", "-H", label("single_source_stuffing", "ffuf-1"),
        "-d", '{"username":"USER","password":"PASS"}',
    ], start=ctx.attack_start + 2, limit_s=limit)


async def hydra_spraying(ctx: Ctx):
    """Password spraying: hydra http-post-form, one password over many
    users, form body, 2 tasks, a browser user agent (H= replaces hydra's)."""
    rng = ctx.rng("hydra")
    d = ctx.out_dir / "tools"
    d.mkdir(parents=True, exist_ok=True)
    users = ["alice", "bob"] + [f"user{i:04d}" for i in rng.sample(range(1, 1001), 150)]
    (d / "spray-users.txt").write_text("\n".join(users) + "\n")
    esc = lambda s: s.replace(":", "\\:")
    # hydra 9.4: the condition comes last, after the optional H= headers.
    # The API answers a failed login 401, which hydra takes for HTTP auth and
    # retries the same try until the answer changes (the filter's 403).
    form = ":".join([
        "/api/login", "username=^USER^&password=^PASS^",
        esc(f"H=X-Forwarded-For: {SPRAY_ADDRESS}"), esc(f"H={label('password_spraying', 'hydra-1')}"),
        esc("H=User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"),
        "S=token",
    ])
    limit = max(5.0, ctx.duration - ctx.attack_start - 8)
    await run_tool(ctx, "password_spraying", [
        "hydra", "-I", "-q", "-t", "2", "-w", "10", "-L", str(d / "spray-users.txt"), "-p", "Spring2026!",
        "-s", str(ctx.port), "127.0.0.1", "http-post-form", form,
    ], start=ctx.attack_start + 6, limit_s=limit)


async def ffuf_bola_sequential(ctx: Ctx):
    """BOLA enumeration of sequential ids: ffuf with FUZZ in the path, ids in order, one thread."""
    d = ctx.out_dir / "tools"
    d.mkdir(parents=True, exist_ok=True)
    (d / "ids.txt").write_text("\n".join(str(i) for i in range(1, 1201)) + "\n")
    limit = max(5.0, ctx.duration - ctx.attack_start - 6)
    await run_tool(ctx, "bola_sequential_ids", [
        "ffuf", "-s", "-mc", "all", "-t", "1", "-p", "0.1", "-maxtime", str(int(limit)),
        "-w", str(d / "ids.txt"), "-u", url(ctx, "/api/users/FUZZ"),
        "-H", f"X-Forwarded-For: {BOLA_SEQ_ADDRESS}", "-H", "User-Agent: python-requests/2.31.0",
        "-H", label("bola_sequential_ids", "ffuf-1"),
    ], start=ctx.attack_start + 4, limit_s=limit)


async def ffuf_scan(ctx: Ctx):
    """Forced browsing / scanning: ffuf over sensitive paths and common
    directories, ffuf's own user agent, 2 threads."""
    d = ctx.out_dir / "tools"
    d.mkdir(parents=True, exist_ok=True)
    (d / "paths.txt").write_text("\n".join(SENSITIVE_PATHS) + "\n")
    limit = max(5.0, ctx.duration - ctx.attack_start - 14)
    await run_tool(ctx, "forced_browsing", [
        "ffuf", "-s", "-mc", "all", "-t", "2", "-p", "0.1", "-maxtime", str(int(limit)),
        "-w", str(d / "paths.txt"), "-u", url(ctx, "/FUZZ"),
        "-H", f"X-Forwarded-For: {SCAN_ADDRESS}", "-H", label("forced_browsing", "ffuf-1"),
    ], start=ctx.attack_start + 12, limit_s=limit)


async def wrk_flood(ctx: Ctx):
    """L7 flood: wrk, one thread, 4 connections, for flood_s seconds."""
    secs = int(min(ctx.profile.flood_s, max(2, ctx.duration - ctx.attack_start - 16)))
    await run_tool(ctx, "l7_flood", [
        "wrk", "-t", "1", "-c", "4", "-d", f"{secs}s", "--timeout", "5s",
        "-H", f"X-Forwarded-For: {FLOOD_ADDRESS}", "-H", label("l7_flood", "wrk-1"),
        "-H", "User-Agent: Mozilla/5.0", url(ctx, "/api/products?page=1"),
    ], start=ctx.attack_start + 14, limit_s=secs + 2)


FFUF_UA = "Fuzz Faster U Fool v1.1.0"  # ffuf 1.1.0's own user agent (Debian 12)


async def office_inside_attackers(ctx: Ctx):
    """From INSIDE the office's NAT address, while its people work: an
    ffuf-style stuffing run (ffuf with its own user agent, 2 threads; the
    generator with ffuf's user agent when ffuf is missing) and a wrk-style
    flood (wrk, no user agent, 2 connections, 5 s; the generator without a
    user agent when wrk is missing). Each must be stopped on its own key
    (address + user agent) without the office being refused."""
    from attacks import combo_list
    from clients import OFFICE_ADDRESS
    from conn import Client
    combos = combo_list(ctx.rng("office_ffuf"), 120)
    d = ctx.out_dir / "tools"
    d.mkdir(parents=True, exist_ok=True)
    start = ctx.attack_start + 1
    flood_s = 5

    async def stuffer():
        if available("ffuf"):
            (d / "office-users.txt").write_text("\n".join(u for u, _ in combos) + "\n")
            (d / "office-passwords.txt").write_text("\n".join(p for _, p in combos) + "\n")
            limit = max(5.0, ctx.duration - start - 4)
            await run_tool(ctx, "office_inside_attackers.ffuf", [
                "ffuf", "-s", "-mc", "all", "-t", "2", "-p", "0.1", "-maxtime", str(int(limit)),
                "-mode", "pitchfork", "-w", str(d / "office-users.txt") + ":USER",
                "-w", str(d / "office-passwords.txt") + ":PASS",
                "-X", "POST", "-u", url(ctx, "/api/login"),
                "-H", "Content-Type: application/json", "-H", f"X-Forwarded-For: {OFFICE_ADDRESS}",
                "-H", label("office_inside_attackers", "ffuf-1"),
                "-d", '{"username":"USER","password":"PASS"}',
            ], start=start, limit_s=limit)
            return
        ctx.notes["office_inside_attackers.ffuf"] = "ffuf not installed: the generator with ffuf's user agent"
        c = Client(ctx.port, "office_inside_attackers", "ffuf-1", OFFICE_ADDRESS,
                   [("user-agent", FFUF_UA), ("accept", "*/*")])
        try:
            for k, (user, password) in enumerate(combos):
                await ctx.at(start + k * 0.05)
                if ctx.left() < 1:
                    break
                await c.request("POST", "/api/login", {"username": user, "password": password})
        finally:
            await c.close()

    async def flood():
        t = start + 2
        if available("wrk"):
            await run_tool(ctx, "office_inside_attackers.wrk", [
                "wrk", "-t", "1", "-c", "2", "-d", f"{flood_s}s", "--timeout", "5s",
                "-H", f"X-Forwarded-For: {OFFICE_ADDRESS}", "-H", label("office_inside_attackers", "wrk-1"),
                url(ctx, "/api/products?page=1"),
            ], start=t, limit_s=flood_s + 2)
            return
        ctx.notes["office_inside_attackers.wrk"] = "wrk not installed: the generator without a user agent"
        conns = [Client(ctx.port, "office_inside_attackers", "wrk-1", OFFICE_ADDRESS, []) for _ in range(2)]

        async def lane(c):
            await ctx.at(t)
            try:
                while ctx.now() < t + flood_s and ctx.left() > 1:
                    await c.request("GET", "/api/products?page=1")
            finally:
                await c.close()

        await asyncio.gather(*(lane(c) for c in conns))

    await asyncio.gather(stuffer(), flood())


async def wget_googlebot(ctx: Ctx):
    """The declared good crawler: wget over a URL list (product pages and
    products, a few of them gone), Googlebot's user agent, from
    66.249.66.1 (Google's crawler range, declared in envoy.yaml), 4 pages/s."""
    d = ctx.out_dir / "tools"
    d.mkdir(parents=True, exist_ok=True)
    n = int(ctx.duration * 3.5)
    paths = [f"/api/products?page={p}" for p in range(1, 31)] + [f"/api/products/{i}" for i in range(1, 561)]
    (d / "crawl-urls.txt").write_text("\n".join(url(ctx, p) for p in paths[:n]) + "\n")
    await run_tool(ctx, "googlebot", [
        "wget", "-nv", "--tries=1", "--timeout=10", "--wait=0.2", "-O", "/dev/null",
        "-i", str(d / "crawl-urls.txt"), "-U", GOOGLEBOT_UA,
        f"--header=X-Forwarded-For: {GOOGLEBOT_ADDRESS}", f"--header={label('googlebot', 'wget-1')}",
    ], start=0.5, limit_s=ctx.duration - 2)


SCENARIOS = [
    Scenario("googlebot", "benign", "wget",
             "declared good crawler: Googlebot UA from 66.249.66.1, product pages and products (some 404) at ~4/s",
             wget_googlebot),
    Scenario("single_source_stuffing", "attack", "ffuf",
             "credential stuffing from one address: 300 combos (JSON body), 4 threads, browser user agent",
             ffuf_stuffing, single_source=True),
    Scenario("password_spraying", "attack", "hydra",
             "password spraying: one password over 152 users, form body, hydra http-post-form, browser user agent",
             hydra_spraying, single_source=True),
    Scenario("bola_sequential_ids", "attack", "ffuf",
             "BOLA enumeration of /api/users/1,2,3,... one thread, one address",
             ffuf_bola_sequential, single_source=True),
    Scenario("forced_browsing", "attack", "ffuf",
             "scanning for sensitive files and admin paths (56 words), ffuf's own user agent",
             ffuf_scan, single_source=True),
    Scenario("office_inside_attackers", "attack", "ffuf+wrk",
             "from inside the office's NAT address while its people work: ffuf stuffing (its own UA, 120 combos, "
             "2 threads) and a wrk flood (no UA, 2 connections, 5 s)",
             office_inside_attackers, per_client=True, planned_clients=lambda p: 2),
    Scenario("l7_flood", "attack", "wrk",
             "L7 flood on /api/products?page=1: wrk, 1 thread, 4 connections, for 10 s",
             wrk_flood, single_source=True),
]

REQUIRED = {"googlebot": "wget", "single_source_stuffing": "ffuf", "password_spraying": "hydra",
            "bola_sequential_ids": "ffuf", "forced_browsing": "ffuf", "l7_flood": "wrk"}
