"""The OpenAI-compatible HTTP server (xllm-server): protocol models, errors, routes, CLI.

``protocol``, ``errors`` and ``sampling`` hold no server state and are shared with the
cluster master.
"""
