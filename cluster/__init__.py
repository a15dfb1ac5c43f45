"""Running medrl on a Ray cluster: runtime env, launcher and KubeRay manifests, job submission."""
