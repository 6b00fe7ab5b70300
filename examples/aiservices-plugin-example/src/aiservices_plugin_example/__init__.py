"""An example aiservices tool package: `tools.example.text.stats`, the word, character and line
counts of a text, with no upstream call.

The package's entry point (`example`, group `aiservices.tools`) names `tools`: the server calls
it once at start-up with a `ToolContext` and serves the tools it returns.
"""

from aiservices_plugin_example.text_stats import NAME, TextStatsTool, tools

__all__ = ["NAME", "TextStatsTool", "tools"]
