from bigbatch.cli import entry

entry()
