"""newsletter: compose and send a weekly research-news email.

The package is a pipeline of small stages (see README.md, "How it works").
Importing it is cheap: heavy libraries are imported by the stage that uses them.
"""

__version__ = "0.1.0"
