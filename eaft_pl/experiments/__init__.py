"""Embedded experiments: self-contained worlds that run offline, with their DataModules and drivers."""
