"""`python -m cluster up` on one node keeps every Ray service on 127.0.0.1, and reports the cluster up only
after a request without the token was refused. (With worker nodes Ray moves its node-to-node services off
loopback: cluster/local.py says why; the session cluster of conftest.py runs that path, check included.)"""

from __future__ import annotations

import http.server
import ipaddress
import json
import os
import subprocess
import sys
import threading

import pytest

from cluster import local

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def descendants(roots: set[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    return found


def _address(hex_address: str) -> ipaddress._BaseAddress:
    raw = bytes.fromhex(hex_address)
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw[::-1])
    # /proc/net/tcp6: four 32-bit words, each in host (little-endian) order.
    return ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))


def listening_sockets(pids: set[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every TCP socket the processes listen on, from /proc."""
    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except OSError:
            continue
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] != "0A" or cols[9] not in inodes:  # 0A: LISTEN
                    continue
                host, port = cols[1].split(":")
                out.append((str(_address(host)), int(port, 16), inodes[cols[9]]))
    return out


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


@pytest.mark.e2e
@pytest.mark.slow_e2e  # ~30 s (most of it Ray draining at `down`); the default suite's session cluster runs the check
@pytest.mark.timeout(300)
def test_a_single_node_cluster_listens_on_loopback_only_and_refuses_requests_without_the_token(tmp_path):
    state_dir = str(tmp_path / "state")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}

    def cluster(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cluster", "--state-dir", state_dir, *args], cwd=REPO_ROOT,
                              env=env, capture_output=True, text=True, timeout=240)

    up = cluster("up", "--data-root", str(tmp_path / "data"))
    try:
        assert up.returncode == 0, up.stderr
        state = local.ClusterState.load(state_dir)
        pids = descendants({p.pid for p in state.processes}) | set(local._session_pids(state.temp_dir))
        sockets = listening_sockets(pids)
        ports = {port for _, port, _ in sockets}
        gcs_port = int(state.gcs_address.rsplit(":", 1)[1])
        dashboard_port = int(state.dashboard_url.rsplit(":", 1)[1])
        assert {gcs_port, dashboard_port} <= ports and len(sockets) >= 5  # GCS, raylet, dashboard, agents...
        exposed = [s for s in sockets if not is_loopback(s[0])]
        assert not exposed, f"listening beyond loopback: {exposed}"
        # What `up` checked before it reported: no token, no answer.
        assert local.unauthenticated_answer(f"{state.dashboard_url}/api/jobs/") is None
        with open(state.token_path) as f:
            assert local._http_ok(f"{state.dashboard_url}/api/version", f.read().strip())
    finally:
        down = cluster("down")
        assert down.returncode == 0, down.stdout + down.stderr


def test_the_unauthenticated_check_reports_a_server_that_answers():
    class Open(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server API
            body = json.dumps({"jobs": []}).encode()
            self.send_response(200 if self.path == "/open" else 401)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Open)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert "without credentials answered 200" in local.unauthenticated_answer(f"{base}/open")
        assert local.unauthenticated_answer(f"{base}/guarded") is None
    finally:
        server.shutdown()
        server.server_close()
