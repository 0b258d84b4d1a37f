"""Where another relay is reached: its entry in the registry (Redis), else RELAY_PEER_URL_TEMPLATE with its node id
(e.g. http://relay-{node}.relay-internal:8080, the DNS name of a StatefulSet pod behind a headless Service).
While Redis cannot be asked, the address it last gave for the node stands in before the template. None: the
registry says the node is not there, and there is no template: the node is gone. RegistryDown: the registry could
not be asked and nothing stands in: the node may well be up, so its calls are not to be called gone."""

from __future__ import annotations

import time
from typing import Callable

from relay.cluster.registry import Registry
from relay.cluster.store import SharedStateError

PLACEHOLDER = "{node}"
MAX_REMEMBERED = 1000  # nodes whose last registered address is kept for when Redis is down


class RegistryDown(Exception):
    """Redis could not say where the node is, and neither a remembered address nor a template stands in."""


def template_url(template: str | None, node: str) -> str | None:
    return template.replace(PLACEHOLDER, node) if template else None


class Peers:
    def __init__(self, registry: Registry | None, template: str | None,
                 clock: Callable[[], float] = time.time) -> None:
        self.registry, self.template, self.clock = registry, template, clock
        self._last_known: dict[str, str] = {}

    async def url_of(self, node: str) -> str | None:
        """The registry's word when it has one; Redis down (counted): its last word, then the template's, else
        RegistryDown."""
        if self.registry is None:
            return template_url(self.template, node)
        try:
            url = await self.registry.lookup(node, self.clock())
        except SharedStateError:
            url = self._last_known.get(node) or template_url(self.template, node)
            if url is None:
                raise RegistryDown(node) from None
            return url
        self._remember(node, url)
        return url or template_url(self.template, node)

    def _remember(self, node: str, url: str | None) -> None:
        if url is None:
            self._last_known.pop(node, None)  # gone from the registry: not to be revived by an outage
            return
        self._last_known[node] = url
        if len(self._last_known) > MAX_REMEMBERED:
            self._last_known.pop(next(iter(self._last_known)))
