"""`driftscope demo`: an offline end-to-end run on a tiny deterministic base/tuned pair the project builds itself."""
from driftscope.demo.run import run_demo

__all__ = ["run_demo"]
