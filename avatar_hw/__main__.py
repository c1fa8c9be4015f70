import sys

from .cli import main       # it imports the commands: a Ctrl-C meanwhile ends it quietly

sys.exit(main())
