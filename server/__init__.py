"""``tokenzip_server``: the HTTP surface of vllm-tokenzip (installed from the ``server/`` folder).

- :mod:`.options`: ``X-TokenZip-*`` headers and ``tokenzip`` body field, merged and validated.
- :mod:`.middleware`: the pure ASGI middleware for ``vllm serve --middleware``.
- :mod:`.stats`: per-request prompt statistics (the ``OnlineRenderer.render_chat`` wrapper).
- :mod:`.metrics`: Prometheus collectors, prefix ``tokenzip_``.
- :mod:`.launcher`: ``tokenzip serve``, ``vllm serve`` with the flags the plugin needs.
"""
