"""Input and output drift: reference ``profiles``, live window ``statistics``, the ``monitor``
that samples requests off the hot path, and ``profile_io`` for reference data files."""
