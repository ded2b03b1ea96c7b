-- Argo CD health check for kubetune.io/FineTuneJob.
-- Install: argocd-cm key `resource.customizations.health.kubetune.io_FineTuneJob` (docs/argocd.md).
-- Reads the status the kubetune operator writes (operator/status.py, operator/reconcile.py):
-- metav1.Condition-shaped conditions Validated, Running, Succeeded, Failed, Suspended (the truth),
-- `phase` (a convenience), `stage`, `progressText`, `output`, and `observedGeneration`.
local hs = {}

local function condition(status, type_)
  if status == nil or status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == type_ then
      return c
    end
  end
  return nil
end

local function is_true(c)
  return c ~= nil and c.status == "True"
end

local function stage_text(status)
  local st = status.stage
  if st ~= nil and st.name ~= nil then
    local text = "stage " .. st.name
    if st.index ~= nil and st.count ~= nil then
      text = text .. " (" .. tostring(st.index + 1) .. "/" .. tostring(st.count) .. ")"
    end
    return text
  end
  return nil
end

local status = obj.status
if status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetune operator to pick up the job"
  return hs
end

-- The status must describe the spec as it is now: until the operator has observed the current
-- generation, whatever the conditions say is about an older spec.
local generation = obj.metadata and obj.metadata.generation or nil
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetune operator to observe generation " .. tostring(generation)
  return hs
end

local failed = condition(status, "Failed")
if is_true(failed) then
  hs.status = "Degraded"
  hs.message = failed.message
  if hs.message == nil or hs.message == "" then
    hs.message = failed.reason or "Failed"
  end
  return hs
end

local succeeded = condition(status, "Succeeded")
if is_true(succeeded) then
  hs.status = "Healthy"
  if status.output ~= nil and status.output.uri ~= nil then
    hs.message = "Succeeded: output at " .. status.output.uri
  else
    hs.message = succeeded.message or "Succeeded"
  end
  return hs
end

local suspended = condition(status, "Suspended")
if is_true(suspended) or (suspended == nil and status.phase == "Suspended") then
  hs.status = "Suspended"
  hs.message = (suspended and suspended.message) or "Suspended"
  if hs.message == nil or hs.message == "" then
    hs.message = "Suspended"
  end
  return hs
end

-- Pending or Running: say where it is
local running = condition(status, "Running")
local parts = {}
local where = stage_text(status)
if is_true(running) then
  local text = "Running"
  if where ~= nil then
    text = text .. " " .. where
  end
  if status.progressText ~= nil and status.progressText ~= "" then
    text = text .. ", " .. status.progressText
  end
  table.insert(parts, text)
else
  table.insert(parts, status.phase or "Pending")
  if running ~= nil and running.message ~= nil and running.message ~= "" then
    table.insert(parts, running.message)
  elseif where ~= nil then
    table.insert(parts, where)
  end
end
hs.status = "Progressing"
hs.message = table.concat(parts, ": ")
return hs
