"""A small NetworkPolicy evaluator (networking.k8s.io/v1 semantics) for the manifest
tests: may this pod open this port on that one?

A connection is allowed when the source's egress allows it and the
destination's ingress allows it. For each side: no policy of its namespace
selects the pod for that direction -> allowed; else allowed when one rule of
one selecting policy matches the peer and the port. Peers: a podSelector
alone means pods of the policy's namespace; a namespaceSelector (with an
optional podSelector) pods of the namespaces it matches; an ipBlock addresses
outside the cluster. Ports are numbers (named ports raise: the policies here
use numbers).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Endpoint:
    """A pod (namespace and labels, its namespace's labels) or an outside address."""

    name: str
    namespace: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    namespace_labels: dict[str, str] = field(default_factory=dict)
    ip: str = ""  # outside the cluster when set

    def __hash__(self) -> int:
        return hash(self.name)


def matches(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """A LabelSelector: matchLabels and matchExpressions (In, NotIn, Exists, DoesNotExist)."""
    if selector is None:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {"In": key in labels and labels[key] in values,
              "NotIn": key not in labels or labels[key] not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def _peer_matches(peer: dict[str, Any], policy_ns: str, other: Endpoint) -> bool:
    if "ipBlock" in peer:
        if not other.ip:
            return False  # pod IPs are not modelled: the policies here never name them
        addr = ipaddress.ip_address(other.ip)
        block = peer["ipBlock"]
        return (addr in ipaddress.ip_network(block["cidr"])
                and not any(addr in ipaddress.ip_network(e) for e in block.get("except", [])))
    if other.ip:
        return False
    if "namespaceSelector" in peer:
        if not matches(peer["namespaceSelector"], other.namespace_labels):
            return False
    elif other.namespace != policy_ns:
        return False
    return "podSelector" not in peer or matches(peer["podSelector"], other.labels)


def _port_matches(ports: list[dict[str, Any]] | None, port: int, protocol: str) -> bool:
    if not ports:
        return True
    for p in ports:
        if p.get("protocol", "TCP") != protocol:
            continue
        if "port" not in p:
            return True
        if not isinstance(p["port"], int):
            raise ValueError(f"named port {p['port']!r}: not modelled")
        if p["port"] <= port <= p.get("endPort", p["port"]):
            return True
    return False


def _side_allows(policies: list[dict[str, Any]], me: Endpoint, other: Endpoint,
                 direction: str, port: int, protocol: str) -> bool:
    """Ingress ("Ingress") or egress ("Egress") of `me` towards `other`."""
    if me.ip:
        return True  # outside the cluster: no policy of ours applies
    key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    selecting = [p for p in policies
                 if p["metadata"]["namespace"] == me.namespace
                 and direction in p["spec"].get("policyTypes", ["Ingress"])
                 and matches(p["spec"]["podSelector"], me.labels)]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get(key) or []:
            peers = rule.get(peers_key)
            if (not peers or any(_peer_matches(peer, me.namespace, other) for peer in peers)) \
                    and _port_matches(rule.get("ports"), port, protocol):
                return True
    return False


def allowed(policies: list[dict[str, Any]], src: Endpoint, dst: Endpoint, port: int,
            protocol: str = "TCP") -> bool:
    """Whether `src` may connect to `dst` on `port`."""
    return (_side_allows(policies, src, dst, "Egress", port, protocol)
            and _side_allows(policies, dst, src, "Ingress", port, protocol))


__all__ = ["Endpoint", "allowed", "matches"]
