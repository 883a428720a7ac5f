import sys

from ellama_recipes.cli.main import main

sys.exit(main())
