"""One call of the SD pipeline: the typed request and what it prepares (``request``, ``modes``, ``text``), the
static denoising loop (``loop``), schedulers as tensor programs (``sampling``, ``schedulers``), the one CUDA graph
mechanism with its static buffers (``graphs``), the bounded caches (``lru``) and batched requests (``batch``)."""
