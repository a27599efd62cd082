"""lmstack.serve: the OpenAI-compatible HTTP server and the web chat page (static/).

protocol.py holds the request schemas; the app, transport (SSE, disconnects), generation driver and
OpenAI body formatting are described in docs/ARCHITECTURE.md.
"""
