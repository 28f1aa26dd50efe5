"""A small calculator, its helpers run by the tests in several ways (threads, processes, sockets)."""

VERSION = "1.0"
