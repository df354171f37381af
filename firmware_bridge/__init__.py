"""MQTT side of edge-slm: the protocol, the bridge service and device-side helpers."""
