"""Turning network failures of ``huggingface_hub`` calls into :class:`~hf_taskarith.errors.HubError`.

HTTP answers (404, 401, 409 ...) are handled where the call is made, because their meaning
depends on the call. What this module handles is the failures that are *not* HTTP answers:
no server at the endpoint (connection refused, DNS), a timeout, a dropped connection, and
``HF_HUB_OFFLINE=1`` refusing every request. Without it they surface as raw ``httpx`` /
``OfflineModeIsEnabled`` exceptions and the CLI prints a traceback.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator

from ..errors import HubError


def effective_endpoint(endpoint: str | None) -> str:
    """The URL a call goes to: ``endpoint``, else ``HF_ENDPOINT`` as ``huggingface_hub`` read it."""
    if endpoint:
        return endpoint.rstrip("/")
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Exception classes meaning "no HTTP answer", for the HTTP stacks ``huggingface_hub`` may use."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                          ("requests", ("ConnectionError", "Timeout"))):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        for name in names:
            cls = getattr(mod, name, None) or getattr(getattr(mod, "exceptions", None), name, None)
            if isinstance(cls, type) and issubclass(cls, BaseException):
                found.append(cls)
    return tuple(found)


def network_error_cause(error: BaseException) -> BaseException | None:
    """The offline-mode or transport error in ``error``'s cause/context chain, if any.

    ``hf_hub_download`` reports a failed metadata request as ``LocalEntryNotFoundError``
    chained to the real cause; this digs it out.
    """
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    transport = _transport_errors()
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OfflineModeIsEnabled):
            return current
        if isinstance(current, transport) and not isinstance(current, HfHubHTTPError):
            return current
        current = current.__cause__ or current.__context__
    return None


def describe_network_error(what: str, endpoint: str | None, error: BaseException) -> str:
    """``what: cannot reach the Hub at URL (...). <how to fix>`` for an offline/transport error."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    url = effective_endpoint(endpoint)
    if isinstance(error, OfflineModeIsEnabled):
        return (f"{what}: cannot reach the Hub at {url}: HF_HUB_OFFLINE=1 blocks all network access "
                "(loopback servers included). Unset HF_HUB_OFFLINE (or set it to 0) before Python imports "
                "huggingface_hub, or inside a process use hf_taskarith.hub.server.client_settings().")
    detail = str(error) or type(error).__name__
    if isinstance(error, TimeoutError) or "timeout" in type(error).__name__.lower():
        return (f"{what}: the Hub at {url} did not answer in time ({type(error).__name__}: {detail}). "
                "Is the server overloaded or the network down? Retry, or raise HF_HUB_DOWNLOAD_TIMEOUT / "
                "HF_HUB_ETAG_TIMEOUT.")
    return (f"{what}: cannot reach the Hub at {url} ({type(error).__name__}: {detail}). Is the server running "
            "(hf-taskarith hub serve) and is the URL right? Check --endpoint / endpoint= and HF_ENDPOINT.")


@contextlib.contextmanager
def network_errors(what: str, endpoint: str | None) -> Iterator[None]:
    """Re-raise offline-mode and transport errors from the block as :class:`HubError`.

    Args:
        what: the subject of the message, e.g. ``"team/tv@v1"``.
        endpoint: the endpoint passed to the call (``None``: ``HF_ENDPOINT``), named in the message.

    Raises:
        HubError: the block failed without an HTTP answer; the message names the endpoint and a fix.
    """
    try:
        yield
    except HubError:
        raise
    except Exception as e:
        cause = network_error_cause(e)
        if cause is None:
            raise
        raise HubError(describe_network_error(what, endpoint, cause)) from e
