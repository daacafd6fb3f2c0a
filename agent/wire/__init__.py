"""Generated KServe v2 / Triton wire messages (see proto/ and generate.py)."""
