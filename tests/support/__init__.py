"""What the tests share: process launchers, clients of three kinds, and a real Redis.

Importable as ``support`` because pytest puts ``tests/`` (the rootdir of
conftest.py, a directory without ``__init__.py``) on sys.path.
"""
