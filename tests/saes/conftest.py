# The pull request's tests find the architectures in SAELens's registry, where SAELens registers
# them once the PR is merged; here this package registers them on import.
import sae_mutual_choice  # noqa: F401
