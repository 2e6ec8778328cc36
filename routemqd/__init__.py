"""routemqd: a supervisor daemon for MQTT worker pools."""

__version__ = "0.1.0"
