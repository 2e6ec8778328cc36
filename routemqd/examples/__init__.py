"""Example handlers shipped with routemqd so the example manifest runs on a fresh machine."""
