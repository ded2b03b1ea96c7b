# kubetune: images (docker buildx, multi-arch), chart, local cluster.
#   make images                      build both images for linux/amd64 + linux/arm64 (cache only)
#   make images PUSH=1               ... and push them to $(REGISTRY)
#   make image-runtime PLATFORMS=linux/arm64 LOAD=1   one platform into the local docker
#   make kind-up kind-load chart-install               a local dev cluster with this tree

REGISTRY   ?= ghcr.io/kubetune
VERSION    ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
PLATFORMS  ?= linux/amd64,linux/arm64
BUILDER    ?= kubetune
BASE_IMAGE ?= nvcr.io/nvidia/pytorch:25.11-py3
PYTHON_IMAGE ?= python:3.11-slim-bookworm
# bitsandbytes from source: Hopper sm_90, B200 sm_100, RTX Blackwell sm_120, GB10 (DGX Spark) sm_121
BNB_CUDA_ARCHS ?= 90;100;120;121
BNB_FROM_SOURCE ?= auto

OPERATOR_IMAGE ?= $(REGISTRY)/operator:$(VERSION)
RUNTIME_IMAGE  ?= $(REGISTRY)/runtime:$(VERSION)

ifeq ($(PUSH),1)
OUTPUT := --push
else ifeq ($(LOAD),1)
OUTPUT := --load
else
OUTPUT :=
endif

BUILDX = docker buildx build --builder $(BUILDER) --platform $(PLATFORMS) $(OUTPUT) \
         --build-arg VERSION=$(VERSION) --provenance=false

.PHONY: help images image-operator image-runtime buildx-builder chart-lint chart-package chart-sync \
        test-chart kind-up kind-down kind-load chart-install

help:
	@sed -n 's/^#   //p' Makefile

buildx-builder:
	docker buildx inspect $(BUILDER) >/dev/null 2>&1 || \
	  docker buildx create --name $(BUILDER) --driver docker-container --bootstrap

images: image-operator image-runtime

image-operator: buildx-builder
	$(BUILDX) --build-arg PYTHON_IMAGE=$(PYTHON_IMAGE) \
	  -f images/operator/Dockerfile -t $(OPERATOR_IMAGE) .

image-runtime: buildx-builder
	$(BUILDX) --build-arg BASE_IMAGE=$(BASE_IMAGE) \
	  --build-arg "BNB_CUDA_ARCHS=$(BNB_CUDA_ARCHS)" --build-arg BNB_FROM_SOURCE=$(BNB_FROM_SOURCE) \
	  -f images/runtime/Dockerfile -t $(RUNTIME_IMAGE) .

HELM ?= helm
chart-sync:
	kubetune crd > charts/kubetune/crds/finetunejob.yaml
	cp dashboards/kubetune.json charts/kubetune/files/kubetune.json

chart-lint:
	$(HELM) lint charts/kubetune --strict

chart-package: chart-lint
	$(HELM) package charts/kubetune --version $(VERSION) --app-version $(VERSION) -d dist

test-chart:
	python -m pytest -q tests/chart tests/e2e/test_chart.py tests/e2e/test_rbac.py tests/e2e/test_argocd.py

KIND_CLUSTER ?= kubetune
kind-up:
	kind create cluster --name $(KIND_CLUSTER) --config kind-config.yaml

kind-down:
	kind delete cluster --name $(KIND_CLUSTER)

kind-load:
	$(MAKE) images PLATFORMS=linux/$(shell uname -m | sed 's/x86_64/amd64/;s/aarch64/arm64/') LOAD=1
	kind load docker-image --name $(KIND_CLUSTER) $(OPERATOR_IMAGE) $(RUNTIME_IMAGE)

chart-install:
	$(HELM) upgrade --install kubetune charts/kubetune -n kubetune-system --create-namespace \
	  --set image.tag=$(VERSION) --set runtime.image.tag=$(VERSION)
