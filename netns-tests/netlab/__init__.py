"""The netns lab: hosts, NAT routers, segments and pods as Linux network namespaces."""

from netlab.lab import Lab, signals_raise
from netlab.ns import LabError
from netlab.topology import Topology

__all__ = ["Lab", "LabError", "Topology", "signals_raise"]
