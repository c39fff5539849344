"""Rewrite backends, registered through the ``mv3d.rewriters`` entry points: ``rules`` (offline,
deterministic labeler), ``ollama`` (the official client) and ``openai`` (OpenAI or any
OpenAI-compatible server: vLLM, Ollama's ``/v1``, ...).

A backend turns one text into its rewrite. It raises :class:`TransientError` for what a retry may
fix (timeouts, 5xx, 429, refused or dropped connections, empty or malformed replies) and
:class:`BackendError` (an ``Mv3dError``) for what it cannot (unknown model, bad credentials).

Each client library (ollama, openai, httpx) is imported inside the backend that uses it: importing
them costs up to a second, and a run uses one backend (the rules backend, none).
"""

from __future__ import annotations

import ipaddress
import os
from importlib import metadata
from urllib.parse import urlparse

from ..errors import ConfigError, Mv3dError
from . import labeler
from .prompts import build_messages

REWRITERS_GROUP = "mv3d.rewriters"
OLLAMA_DEFAULT = "http://127.0.0.1:11434"


class TransientError(Exception):
    """A failure that a retry may fix."""


class BackendError(Mv3dError):
    """A failure no retry will fix; stops the run."""


def normalize_url(url: str) -> str:
    url = url.strip().rstrip("/")
    return url if "://" in url else f"http://{url}"


def is_loopback(url: str) -> bool:
    """True when ``url``'s host is this machine whatever a resolver says: ``localhost`` (any case),
    an address in 127.0.0.0/8, ``::1`` (also as ``::ffff:127.x.y.z``), or ``0.0.0.0`` / ``::``, which
    clients connect to as this machine. Every other name is remote, never resolved here: a resolver
    (DNS) decides where ``localhost.``, ``localhost.example.com`` or ``127.0.0.1.nip.io`` go, and
    ``http://127.0.0.1@evil.com/`` goes to evil.com (the host the ollama and openai clients use)."""
    try:
        host = urlparse(normalize_url(url)).hostname or ""
    except ValueError:  # e.g. an unclosed "[" of an IPv6 address
        return False
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_loopback or ip.is_unspecified


def local_only(url: str) -> dict:
    """httpx settings that keep the requests to a loopback ``url`` on this machine: no proxy from the
    environment (``HTTP_PROXY``/``ALL_PROXY`` would otherwise receive the reports) and no redirect
    (one could lead anywhere). Empty for a remote ``url``: that needs ``--allow-remote`` anyway, and
    may need the proxy."""
    return {"trust_env": False, "follow_redirects": False} if is_loopback(url) else {}


class RewriteBackend:
    name = ""
    endpoint: str | None = None  # where the texts are sent (None: nowhere, offline)

    @property
    def model(self) -> str:
        raise NotImplementedError

    def rewrite(self, text: str) -> str:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.name}:{self.model}" + (f" at {self.endpoint}" if self.endpoint else "")


class RulesBackend(RewriteBackend):
    """The offline labeler: canonical presence/absence statements, deterministic."""

    name = "rules"

    def __init__(self, **_options):
        pass

    @property
    def model(self) -> str:
        return f"labeler-{getattr(labeler, 'VERSION', '1')}"

    def rewrite(self, text: str) -> str:
        return labeler.rules_rewrite(text)


class OllamaBackend(RewriteBackend):
    name = "ollama"

    def __init__(self, *, model: str | None = None, host: str | None = None, timeout: float = 60.0,
                 temperature: float = 0.0, seed: int | None = 0, **_options):
        import ollama

        self._model = model or "llama3.1:8b"
        self.endpoint = normalize_url(host or os.environ.get("OLLAMA_HOST") or OLLAMA_DEFAULT)
        self._client = ollama.Client(host=self.endpoint, timeout=timeout, **local_only(self.endpoint))
        self._options = {"temperature": temperature, **({"seed": seed} if seed is not None else {})}

    @property
    def model(self) -> str:
        return self._model

    def rewrite(self, text: str) -> str:
        import httpx
        import ollama

        try:
            resp = self._client.chat(model=self._model, messages=build_messages(text), options=self._options,
                                     stream=False)
            return _content(resp.message.content)
        except ollama.ResponseError as e:
            if e.status_code == 404:
                raise BackendError(f"model {self._model!r} is not available at {self.endpoint}: {e.error}; pull it "
                                   f"first (ollama pull {self._model}) or pass another --model") from e
            raise _status_error(e.status_code, e.error, self.endpoint) from e
        except (httpx.HTTPError, ConnectionError, OSError, ValueError, AttributeError, TypeError) as e:
            raise TransientError(f"{type(e).__name__}: {e}") from e


class OpenAIBackend(RewriteBackend):
    name = "openai"

    def __init__(self, *, model: str | None = None, base_url: str | None = None, timeout: float = 60.0,
                 temperature: float = 0.0, seed: int | None = 0, **_options):
        import openai

        if not model:
            raise ConfigError("--backend openai needs --model (e.g. gpt-4o-mini, or the model name your vLLM serves)")
        self._model = model
        self.endpoint = normalize_url(base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1")
        key = os.environ.get("OPENAI_API_KEY")
        if not key and not is_loopback(self.endpoint):
            raise ConfigError(f"no API key for {self.endpoint}: set OPENAI_API_KEY in the environment "
                              "(keys are never read from options or mv3d.toml)")
        local = local_only(self.endpoint)
        self._client = openai.OpenAI(base_url=self.endpoint, api_key=key or "EMPTY", max_retries=0, timeout=timeout,
                                     http_client=openai.DefaultHttpxClient(**local) if local else None)
        self._kwargs = {"temperature": temperature, **({"seed": seed} if seed is not None else {})}

    @property
    def model(self) -> str:
        return self._model

    def rewrite(self, text: str) -> str:
        import openai

        try:
            resp = self._client.chat.completions.create(model=self._model, messages=build_messages(text),
                                                        **self._kwargs)
            return _content(resp.choices[0].message.content)
        except openai.APIStatusError as e:
            if e.status_code == 404:
                raise BackendError(f"model {self._model!r} not found at {self.endpoint}; pass the name the server "
                                   "serves (GET /v1/models lists them)") from e
            if e.status_code in (401, 403):
                raise BackendError(f"{self.endpoint} refused the credentials ({e.status_code}); check OPENAI_API_KEY "
                                   "in the environment") from e
            raise _status_error(e.status_code, e.message, self.endpoint) from e
        except (openai.APIError, OSError, ValueError, AttributeError, TypeError, IndexError) as e:
            raise TransientError(f"{type(e).__name__}: {e}") from e


def _content(content) -> str:
    if not isinstance(content, str) or not content.strip():
        raise TransientError("empty reply")
    return content.strip()


def _status_error(status: int, message: str, endpoint: str) -> Exception:
    if 300 <= status < 400:
        return BackendError(f"{endpoint} answered with a redirect (HTTP {status}); mv3d follows no redirect from a "
                            "server on this machine, as it could send the reports to another one: pass the address "
                            "it redirects to as --host/--base-url (with --allow-remote if that is not this machine)")
    if status >= 500 or status in (408, 409, 429):
        return TransientError(f"HTTP {status}: {message}")
    return BackendError(f"the LLM server answered HTTP {status}: {message}")


BUILTIN = {"rules": RulesBackend, "ollama": OllamaBackend, "openai": OpenAIBackend}


def available_backends() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=REWRITERS_GROUP)}


def create_backend(name: str, **options) -> RewriteBackend:
    """Instantiate a backend found through the ``mv3d.rewriters`` entry points."""
    eps = available_backends()
    if name not in eps:
        known = ", ".join(sorted(eps)) or "none"
        raise ConfigError(f"unknown rewrite backend {name!r}; installed: {known}")
    try:
        cls = eps[name].load()
    except Exception as e:
        raise ConfigError(f"rewrite backend {name!r} ({eps[name].value}) failed to load: {e}") from e
    return cls(**options)
