"""The HTTP server: OpenAI-compatible request schemas, the scheduler, the chat/completions endpoints, the app and
the chat page (web/).
"""
