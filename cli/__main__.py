"""python -m oodfast.cli"""

from oodfast.cli import main

main()
