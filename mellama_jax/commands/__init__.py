"""What each command does with its request: call the room that does the work, print what it returns, and give the
exit code. `cli.py` finds them by name; each module here is imported only for the command that runs."""
