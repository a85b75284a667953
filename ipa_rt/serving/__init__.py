"""``ipa_rt serve``: many users on one or many machines through Ray Serve (``pip install 'ipa_rt[serve]'``).

- :mod:`.config`: what is served (models, replicas, batching, limits), one dataclass read from JSON.
- :mod:`.protocol`: the HTTP API's request fields, validated into ``pipe.batch`` requests (no Ray needed).
- :mod:`.auth`: the optional API key (``--api-key``, ``IPA_RT_API_KEY``, the config's ``api_key``) and the ASGI gate
  that requires it on every endpoint but ``/healthz`` (no Ray needed).
- :mod:`.app`: the Ray Serve application: a gateway (HTTP, validation, 4xx/503, retry when a replica dies)
  and one model deployment per model (a pipeline per replica, ``serve.batch`` feeding ``pipe.batch``).
- :mod:`.cli`: ``ipa_rt serve [--example] [--config FILE] [--address ADDR]``.

Nothing here is imported by the rest of ipa_rt, and Ray is imported only by :mod:`.app` and :mod:`.cli`.
"""
