"""The technician's kiosk: a local web page on the shared engine (server.py),
its PIN gate for the network (auth.py), and its files (static/)."""
