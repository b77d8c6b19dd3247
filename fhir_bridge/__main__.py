"""`python -m fhir_bridge` is the `fhir-bridge` command."""

from fhir_bridge.cli import main

main()
