"""End-to-end suites: real server and client processes on 127.0.0.1."""
