{{- define "imds-filter.labels" -}}
app.kubernetes.io/name: imds-filter
{{- end -}}
