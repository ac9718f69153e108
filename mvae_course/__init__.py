"""mvae_course: the helper package of the multimodal VAE course.

Every idea a lesson teaches lives here once, with tests; the notebooks import it.
"""

__version__ = "0.1.0"
