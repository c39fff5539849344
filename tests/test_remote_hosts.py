"""The remote-host rule of `mv3d rewrite`, observed on the wire: reports go to a server that is not
this machine only with --allow-remote.

Remote-looking names really reach the loopback fake server: the mv3d subprocesses load a test-only
``sitecustomize`` (FAKE_DNS below) that resolves the test's host names to 127.0.0.1, fails every
other name, and logs each lookup. So "nothing was sent" is seen (the fake server records no request
and no name was looked up), and the same command with --allow-remote is seen to arrive, with the
remote name in its Host header, through the real ollama and openai clients.
"""

from __future__ import annotations

import os
from urllib.parse import urlparse

import polars as pl
import pytest

from helpers import copy_project, make_prepped_project, run_mv3d
from mv3dtk.testing.fake_llm import FakeLLM, Redirect
from mv3dtk.text.backends import OllamaBackend, OpenAIBackend, is_loopback, normalize_url

FAKE_DNS = '''\
"""Test-only name resolution for the mv3d subprocesses of tests/test_remote_hosts.py: the names in
$FAKE_DNS resolve to 127.0.0.1, every other name fails (nothing can leave this machine), and each
lookup is appended to $FAKE_DNS_LOG."""
import os
import socket

_NAMES = {n.lower() for n in os.environ["FAKE_DNS"].split(",") if n}


def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
    name = (host.decode() if isinstance(host, bytes) else host or "").lower()
    with open(os.environ["FAKE_DNS_LOG"], "a") as log:
        log.write(f"{name} {port}\\n")
    if name not in _NAMES:
        raise socket.gaierror(socket.EAI_NONAME, f"fake DNS: {name!r} is not a test name")
    return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", int(port)))]


socket.getaddrinfo = getaddrinfo
'''

REMOTE_NAMES = ("gpu-box.example.org", "vllm.example.org", "10.20.30.40", "evil.example", "127.0.0.1.nip.io",
                "proxy.example.net", "elsewhere.example.org")
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "127.1.2.3", "0.0.0.0")
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy",
              "no_proxy")

# --------------------------------------------------------------------------------------------------
# is_loopback itself
# --------------------------------------------------------------------------------------------------

LOOPBACK = [
    "http://127.0.0.1:11434", "127.0.0.1:11434", "http://localhost:8000/v1", "http://LOCALHOST:8000",
    "http://[::1]:11434", "http://127.1.2.3:5", "http://0.0.0.0:11434", "0.0.0.0", "http://[::]:5",
    "http://[::ffff:127.0.0.1]:5", "https://127.0.0.1/v1", "http://evil.com@127.0.0.1:5",
    "http://evil.com\\@127.0.0.1:5", "http://127.0.0.1:5#@evil.com", "http://127.0.0.1:5/?x=@evil.com",
]
REMOTE = [
    "http://10.20.30.40:11434", "gpu-box:11434", "https://api.openai.com/v1", "http://192.168.1.5",
    "http://[2001:db8::1]:5", "http://[::ffff:10.0.0.1]:5",
    "http://localhost.example.com:5", "http://127.0.0.1.nip.io:5", "http://localhost.:5", "http://foo.localhost:5",
    "http://127.0.0.1.:5",  # not an IP literal: a name for a resolver
    "http://127.0.0.1@evil.com/", "http://127.0.0.1:5@evil.com", "http://127.0.0.1\\@evil.com:5",
    "http://127.0.0.1%2f@evil.com:5",
    "http://127.1:5", "http://2130706433:5", "http://0x7f.1:5",  # resolvers may read them as 127.0.0.1: refused, safe
    "http://%6c%6f%63%61%6c%68%6f%73%74:5", "http://[::1", "", "http://:5",
]


@pytest.mark.parametrize("url", LOOPBACK)
def test_is_loopback_accepts_this_machine(url):
    assert is_loopback(url)


@pytest.mark.parametrize("url", REMOTE)
def test_is_loopback_treats_everything_else_as_remote(url):
    assert not is_loopback(url)


@pytest.mark.parametrize("url", [u for u in LOOPBACK + REMOTE if u not in ("http://[::1", "", "http://:5")])
def test_the_clients_connect_to_the_host_is_loopback_judged(url, monkeypatch):
    """The real clients parse the URL as is_loopback does: userinfo, backslashes, '#' and '?' do not
    make them connect to another host than the one judged."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-x")
    judged = urlparse(normalize_url(url)).hostname
    ollama_host = OllamaBackend(host=url)._client._client.base_url.host
    openai_host = OpenAIBackend(model="m", base_url=url)._client.base_url.host
    assert ollama_host == openai_host == judged


def test_a_loopback_client_uses_no_proxy_and_follows_no_redirect(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-x")
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example.net:3128")
    for backend in (OllamaBackend(host="http://127.0.0.1:5"), OpenAIBackend(model="m", base_url="http://[::1]:5/v1")):
        client = backend._client._client
        assert not client.trust_env and not client.follow_redirects, backend.name
    remote = OpenAIBackend(model="m", base_url="http://vllm.example.org:5/v1")._client._client
    assert remote.trust_env  # a remote server (with --allow-remote) may need the proxy


# --------------------------------------------------------------------------------------------------
# on the wire: the real CLI, the real clients, remote-looking names that land on the fake server
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepped(tmp_path_factory):
    return make_prepped_project(tmp_path_factory.mktemp("remote"), n_train=2, n_valid=1, seed=5)


@pytest.fixture
def project(prepped, tmp_path):
    return copy_project(prepped, tmp_path / "p")


@pytest.fixture
def dns(tmp_path, monkeypatch):
    """Subprocesses resolve the test names to 127.0.0.1 (and nothing else); returns the lookup log."""
    site = tmp_path / "fake_dns"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FAKE_DNS)
    log = tmp_path / "dns.log"
    log.touch()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("FAKE_DNS", ",".join(REMOTE_NAMES + LOOPBACK_NAMES))
    monkeypatch.setenv("FAKE_DNS_LOG", str(log))
    for var in PROXY_VARS + ("OLLAMA_HOST", "OPENAI_BASE_URL", "OPENAI_API_KEY", "OLLAMA_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    return log


@pytest.fixture
def llm():
    with FakeLLM() as server:
        yield server
    assert server.errors == [], "\n".join(server.errors)


def _lookups(log) -> list[str]:
    return [line.split(" ")[0] for line in log.read_text().splitlines()]


def _rewrite(project, args, env, *more):
    return run_mv3d("-P", str(project.root), "rewrite", *args, "--scope", "reports", "--limit", "1", *more,
                    env=env, check=False)


# (backend options, environment) with {port} for the fake server's; REMOTE_NAMES resolve to it. Each way of
# naming the server, and two tricky names (the rest of them: the is_loopback tests above)
REMOTE_RUNS = {
    "host": (["--backend", "ollama", "--host", "http://gpu-box.example.org:{port}"], {}),
    "OLLAMA_HOST": (["--backend", "ollama"], {"OLLAMA_HOST": "gpu-box.example.org:{port}"}),
    "base-url": (["--backend", "openai", "--base-url", "http://10.20.30.40:{port}/v1"], {}),
    "OPENAI_BASE_URL": (["--backend", "openai"], {"OPENAI_BASE_URL": "http://vllm.example.org:{port}/v1"}),
    "userinfo": (["--backend", "ollama", "--host", "http://127.0.0.1@evil.example:{port}"], {}),
    "nip.io": (["--backend", "openai", "--base-url", "http://127.0.0.1.nip.io:{port}/v1"], {}),
}


def _fill(run, port):
    args, env = run
    args = [a.format(port=port) for a in args + ["--model", "fake-llm"]]
    env = {k: v.format(port=port) for k, v in env.items()}
    if "openai" in args:
        env["OPENAI_API_KEY"] = "sk-test"
    return args, env


@pytest.mark.llm
@pytest.mark.parametrize("case", list(REMOTE_RUNS))
def test_a_remote_server_receives_nothing_without_allow_remote(project, llm, dns, case):
    args, env = _fill(REMOTE_RUNS[case], llm.port)
    proc = _rewrite(project, args, env)
    assert proc.returncode == 1, proc.stderr
    assert "not this machine; nothing was sent" in proc.stderr and "--allow-remote" in proc.stderr
    assert llm.requests == [] and _lookups(dns) == []  # nothing was sent, not even a name looked up
    assert not (project.root / "rewrite" / "reports.parquet").exists()

    proc = _rewrite(project, args, env, "--allow-remote")  # the same run, allowed: it really goes there
    assert proc.returncode == 0, proc.stderr
    named = next(v for v in [*REMOTE_RUNS[case][0], *REMOTE_RUNS[case][1].values()] if "{port}" in v)
    remote = urlparse(normalize_url(named.format(port=llm.port)))
    chats = llm.chat_requests()
    assert len(chats) == 1 and chats[0].headers["host"] == f"{remote.hostname}:{llm.port}"
    assert remote.hostname in _lookups(dns)
    reports = pl.read_parquet(project.root / "rewrite" / "reports.parquet")
    assert reports.height == 1 and reports["llm_output"].null_count() == 0


@pytest.mark.llm
def test_the_default_openai_server_is_refused_before_any_lookup(project, dns):
    proc = _rewrite(project, ["--backend", "openai", "--model", "gpt-4o-mini"], {"OPENAI_API_KEY": "sk-test"})
    assert proc.returncode == 1 and "https://api.openai.com/v1" in proc.stderr and "--allow-remote" in proc.stderr
    assert _lookups(dns) == []


# URLs naming this machine: allowed without --allow-remote, sent directly although the environment names a
# (remote-looking) proxy, which would otherwise receive the reports
LOOPBACK_RUNS = {
    "ipv6": (["--backend", "ollama", "--host", "http://[::1]:{port}"], {}),
    "127/8": (["--backend", "openai", "--base-url", "http://127.1.2.3:{port}/v1"], {}),
    "0.0.0.0": (["--backend", "ollama"], {"OLLAMA_HOST": "0.0.0.0:{port}"}),
    "host-over-env": (["--backend", "ollama", "--host", "LOCALHOST:{port}"],
                      {"OLLAMA_HOST": "http://gpu-box.example.org:{port}"}),
}
_HOST_HEADER = {"ipv6": "[::1]", "127/8": "127.1.2.3", "0.0.0.0": "0.0.0.0", "host-over-env": "localhost"}


@pytest.mark.llm
@pytest.mark.parametrize("case", list(LOOPBACK_RUNS))
def test_this_machine_is_reached_directly_without_allow_remote(project, llm, dns, monkeypatch, case):
    with FakeLLM() as proxy:
        for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
            monkeypatch.setenv(var, f"http://proxy.example.net:{proxy.port}")
        args, env = _fill(LOOPBACK_RUNS[case], llm.port)
        proc = _rewrite(project, args, env)
    assert [r.path for r in proxy.requests] == [], "the proxy got the reports"
    assert "proxy.example.net" not in _lookups(dns)
    assert proc.returncode == 0, proc.stderr
    chats = llm.chat_requests()
    assert len(chats) == 1 and chats[0].headers["host"] == f"{_HOST_HEADER[case]}:{llm.port}"
    assert "gpu-box.example.org" not in _lookups(dns)


@pytest.mark.llm
@pytest.mark.parametrize("backend", ["ollama", "openai"])
def test_a_local_server_cannot_redirect_the_reports_elsewhere(project, llm, dns, backend):
    with FakeLLM() as elsewhere:
        path = "/api/chat" if backend == "ollama" else "/v1/chat/completions"
        llm.script(Redirect(f"http://elsewhere.example.org:{elsewhere.port}{path}"))
        url = llm.url if backend == "ollama" else llm.openai_url
        args = ["--backend", backend, "--host" if backend == "ollama" else "--base-url", url]
        proc = _rewrite(project, *_fill((args, {}), llm.port))
    assert [r.headers["host"] for r in elsewhere.requests] == [], "the redirect took the reports elsewhere"
    assert "elsewhere.example.org" not in _lookups(dns)
    assert proc.returncode == 1 and "answered with a redirect (HTTP 307)" in proc.stderr, proc.stderr
    assert [r.status for r in llm.chat_requests()] == [307]
