"""``ipa_rt serve``: many users on one or many machines through Ray Serve (``pip install 'ipa_rt[serve]'``).

:mod:`.config` (what is served), :mod:`.protocol` (the HTTP fields, validated into ``pipe.batch`` requests),
:mod:`.auth` (the optional API key and its gate), :mod:`.app` (the Ray Serve gateway and model deployments) and
:mod:`.cli` (``ipa_rt serve``). Nothing here is imported by the rest of ipa_rt, and Ray is imported only by
:mod:`.app` and :mod:`.cli` (docs/guides/serving.md: the API, its errors and limits).
"""
