"""The process in one slot: an at-least-once MQTT consumer that runs one route's handler.

Modules by job: ``lifecycle`` (the process: signals, commands from the master, heartbeats, stop
modes), ``link`` (the only importer of paho-mqtt: connect, subscribe, the socket primitives),
``drivers`` (the thread or event loop that reads the socket), ``runners`` (who calls the
handler), ``delivery`` (the one place a message is acknowledged, dead-lettered or given up),
``stats`` (counters and heartbeat totals) and ``hookrun`` (heartbeats while a hook runs, how a
hook failure is logged and reported).
"""

from routemqd.worker.lifecycle import run, set_parent_death_signal
from routemqd.worker.stats import DURATION_BUCKETS

__all__ = ["DURATION_BUCKETS", "run", "set_parent_death_signal"]
