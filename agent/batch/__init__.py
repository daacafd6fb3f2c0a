"""Batch scoring: files in, the same verified model as serving, files out.

``plan`` is pure (which columns feed which input, batch numbering, progress
text); ``convert`` turns Arrow columns into tensors and back, finding bad rows;
``formats`` reads and writes files; ``resume`` keeps the durable progress
record and part files; ``runner`` drives them; ``command`` is the CLI.
"""
