// Command render renders a Helm 3 chart the way `helm template` does, for
// machines without the helm binary: Go's text/template with the sprig
// function library (as Helm uses) plus Helm's own functions (include, tpl,
// required, fail, toYaml, fromYaml, toJson, fromJson, lookup).
//
//	render [-f values.yaml ...] [-name release] [-namespace ns] [-json] <chart dir>
//
// Like Helm, it first validates the merged values against the chart's
// values.schema.json, if there is one (with gojsonschema, as Helm does).
// It prints every manifest, each after a "# Source:" line, like helm; with
// -json, a JSON array of the manifests' objects instead (for tests). Values
// files are deep-merged over the chart's values.yaml in order. It exits 1
// with the template error on any failure (a `required` or `fail`, a bad
// template, an unknown function).
//
// Build offline with Debian's Go packages (tests/helm/check.sh does):
//
//	GO111MODULE=off GOPATH=/usr/share/gocode GOPROXY=off go build -o render render.go
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"text/template"

	"github.com/Masterminds/sprig"
	"github.com/xeipuuv/gojsonschema"
	"sigs.k8s.io/yaml"
)

type valueFiles []string

func (v *valueFiles) String() string     { return strings.Join(*v, ",") }
func (v *valueFiles) Set(s string) error { *v = append(*v, s); return nil }

// files is .Files: the chart's non-template files.
type files map[string][]byte

func (f files) Get(name string) string { return string(f[name]) }

// apiVersions is .Capabilities.APIVersions.
type apiVersions []string

func (a apiVersions) Has(v string) bool {
	for _, x := range a {
		if x == v {
			return true
		}
	}
	return false
}

func main() {
	var vf valueFiles
	flag.Var(&vf, "f", "values file merged over the chart's values.yaml (repeatable)")
	name := flag.String("name", "fanout", "release name")
	namespace := flag.String("namespace", "default", "release namespace")
	asJSON := flag.Bool("json", false, "print a JSON array of the rendered objects")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: render [-f values.yaml ...] [-name release] [-namespace ns] [-json] <chart dir>")
		os.Exit(2)
	}
	out, err := render(flag.Arg(0), vf, *name, *namespace)
	if err != nil {
		fmt.Fprintln(os.Stderr, "render:", err)
		os.Exit(1)
	}
	if *asJSON {
		if out, err = toJSONArray(out); err != nil {
			fmt.Fprintln(os.Stderr, "render:", err)
			os.Exit(1)
		}
	}
	os.Stdout.WriteString(out)
}

// toJSONArray parses a multi-document YAML stream into a JSON array.
func toJSONArray(stream string) (string, error) {
	var objs []json.RawMessage
	for _, doc := range strings.Split(stream, "\n---\n") {
		doc = strings.TrimPrefix(doc, "---\n")
		if strings.TrimSpace(doc) == "" {
			continue
		}
		j, err := yaml.YAMLToJSON([]byte(doc))
		if err != nil {
			return "", err
		}
		if string(j) != "null" {
			objs = append(objs, j)
		}
	}
	b, err := json.Marshal(objs)
	return string(b) + "\n", err
}

func readYAML(path string) (map[string]interface{}, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	m := map[string]interface{}{}
	if err := yaml.Unmarshal(data, &m); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return m, nil
}

// merge deep-merges src over dst, as Helm merges values files: maps merge
// key by key, anything else is replaced, and null deletes a key.
func merge(dst, src map[string]interface{}) map[string]interface{} {
	for k, v := range src {
		if v == nil {
			delete(dst, k)
			continue
		}
		sm, sok := v.(map[string]interface{})
		dm, dok := dst[k].(map[string]interface{})
		if sok && dok {
			dst[k] = merge(dm, sm)
		} else {
			dst[k] = v
		}
	}
	return dst
}

func render(chartDir string, valueFiles []string, release, namespace string) (string, error) {
	chartMeta, err := readYAML(filepath.Join(chartDir, "Chart.yaml"))
	if err != nil {
		return "", err
	}
	if chartMeta["apiVersion"] != "v2" {
		return "", errors.New("Chart.yaml: apiVersion must be v2 (Helm 3)")
	}
	values, err := readYAML(filepath.Join(chartDir, "values.yaml"))
	if err != nil {
		return "", err
	}
	for _, f := range valueFiles {
		over, err := readYAML(f)
		if err != nil {
			return "", err
		}
		values = merge(values, over)
	}
	chartName, _ := chartMeta["name"].(string)
	if err := validateValues(chartDir, chartName, values); err != nil {
		return "", err
	}
	chart := map[string]interface{}{}
	for k, v := range chartMeta {
		// Helm exposes Chart.yaml's fields capitalised: .Chart.AppVersion.
		chart[strings.ToUpper(k[:1])+k[1:]] = v
	}

	chartFiles := files{}
	var templates []string
	err = filepath.Walk(chartDir, func(path string, info os.FileInfo, err error) error {
		if err != nil || info.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(chartDir, path)
		if strings.HasPrefix(rel, "templates/") {
			templates = append(templates, rel)
			return nil
		}
		data, err := os.ReadFile(path)
		chartFiles[rel] = data
		return err
	})
	if err != nil {
		return "", err
	}
	sort.Strings(templates)

	root := template.New("chart")
	funcs := sprig.TxtFuncMap()
	// Helm removes these two for safety.
	delete(funcs, "env")
	delete(funcs, "expandenv")
	funcs["toYaml"] = func(v interface{}) string {
		b, err := yaml.Marshal(v)
		if err != nil {
			return ""
		}
		return strings.TrimSuffix(string(b), "\n")
	}
	funcs["fromYaml"] = func(s string) map[string]interface{} {
		m := map[string]interface{}{}
		if err := yaml.Unmarshal([]byte(s), &m); err != nil {
			m["Error"] = err.Error()
		}
		return m
	}
	funcs["toJson"] = func(v interface{}) string {
		b, err := json.Marshal(v)
		if err != nil {
			return ""
		}
		return string(b)
	}
	funcs["fromJson"] = func(s string) map[string]interface{} {
		m := map[string]interface{}{}
		if err := json.Unmarshal([]byte(s), &m); err != nil {
			m["Error"] = err.Error()
		}
		return m
	}
	funcs["required"] = func(msg string, v interface{}) (interface{}, error) {
		if v == nil {
			return nil, errors.New(msg)
		}
		if s, ok := v.(string); ok && s == "" {
			return nil, errors.New(msg)
		}
		return v, nil
	}
	funcs["fail"] = func(msg string) (string, error) { return "", errors.New(msg) }
	funcs["lookup"] = func(string, string, string, string) map[string]interface{} {
		// helm template has no cluster either: lookup returns nothing.
		return map[string]interface{}{}
	}
	funcs["include"] = func(name string, data interface{}) (string, error) {
		var buf bytes.Buffer
		if err := root.ExecuteTemplate(&buf, name, data); err != nil {
			return "", err
		}
		return buf.String(), nil
	}
	funcs["tpl"] = func(text string, data interface{}) (string, error) {
		t, err := root.Clone()
		if err != nil {
			return "", err
		}
		t, err = t.New("tpl").Parse(text)
		if err != nil {
			return "", err
		}
		var buf bytes.Buffer
		if err := t.Execute(&buf, data); err != nil {
			return "", err
		}
		return buf.String(), nil
	}
	root.Funcs(funcs).Option("missingkey=zero")
	for _, name := range templates {
		data, err := os.ReadFile(filepath.Join(chartDir, name))
		if err != nil {
			return "", err
		}
		if _, err := root.New(chartName + "/" + name).Parse(string(data)); err != nil {
			return "", err
		}
	}

	var out strings.Builder
	for _, name := range templates {
		base := filepath.Base(name)
		if strings.HasPrefix(base, "_") || base == "NOTES.txt" {
			continue
		}
		full := chartName + "/" + name
		ctx := map[string]interface{}{
			"Values": values,
			"Chart":  chart,
			"Files":  chartFiles,
			"Release": map[string]interface{}{
				"Name": release, "Namespace": namespace, "Service": "Helm",
				"IsInstall": true, "IsUpgrade": false, "Revision": 1,
			},
			"Capabilities": map[string]interface{}{
				"KubeVersion": map[string]interface{}{"Version": "v1.29.0", "Major": "1", "Minor": "29"},
				"APIVersions": apiVersions{"v1", "apps/v1", "policy/v1", "autoscaling/v2",
					"monitoring.coreos.com/v1"},
			},
			"Template": map[string]interface{}{"Name": full, "BasePath": chartName + "/templates"},
		}
		var buf bytes.Buffer
		if err := root.ExecuteTemplate(&buf, full, ctx); err != nil {
			return "", err
		}
		text := strings.ReplaceAll(buf.String(), "<no value>", "")
		if strings.TrimSpace(text) == "" {
			continue
		}
		fmt.Fprintf(&out, "---\n# Source: %s\n%s\n", full, strings.TrimSpace(text))
	}
	return out.String(), nil
}

// validateValues checks values against the chart's values.schema.json, with
// Helm's error format.
func validateValues(chartDir, chartName string, values map[string]interface{}) error {
	schema, err := os.ReadFile(filepath.Join(chartDir, "values.schema.json"))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	result, err := gojsonschema.Validate(gojsonschema.NewBytesLoader(schema), gojsonschema.NewGoLoader(values))
	if err != nil {
		return fmt.Errorf("values.schema.json: %w", err)
	}
	if result.Valid() {
		return nil
	}
	var msg strings.Builder
	fmt.Fprintf(&msg, "values don't meet the specifications of the schema(s) in the following chart(s):\n%s:\n", chartName)
	for _, e := range result.Errors() {
		fmt.Fprintf(&msg, "- %s\n", e)
	}
	return errors.New(msg.String())
}
