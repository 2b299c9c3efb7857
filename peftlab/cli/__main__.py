"""``python -m peftlab.cli ...`` (also under ``accelerate launch -m peftlab.cli ...``)."""
from .app import main

main()
