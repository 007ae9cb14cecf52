"""targetmirror: a split-mirror block service for LIO, served through TCMU."""

__version__ = "0.1.0"
