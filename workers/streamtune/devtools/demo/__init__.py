"""``streamtune demo``, ``replay`` and ``tail``: the system on the embedded stack, with a live view."""
