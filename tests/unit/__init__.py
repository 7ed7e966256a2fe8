"""In-process tests of the modules that need no socket and no process."""
