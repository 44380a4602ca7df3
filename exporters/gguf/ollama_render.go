// ollama_render renders Modelfile TEMPLATEs the way Ollama does, with Go's own text/template.
//
// Written for edge-toolkit from Ollama's documented data model (docs/template.mdx) and the behaviour of its
// template package and chat handler as of ollama@fb30760 (template/template.go, server/routes.go): no Ollama code
// is copied. Only Go's standard library is used, so it builds offline (GOPROXY=off) with Debian's golang-go.
//
// stdin:  {"jobs": [{"template": "...", "cases": [{"system": "...", "messages": [...], "think": null|true|false,
//                                                   "tools": [...]}]}]}
// stdout: {"jobs": [{"parse_error": "...", "parse_line": N, "results": [{"prompt": "...", "error": "..."}]}]}
//
// What is reproduced, because each changes the prompt bytes:
//   - parsing: template.New("").Option("missingkey=zero") with Ollama's extra functions (json, currentDate,
//     yesterdayDate, toTypeScriptType); a template that names neither .Messages nor .Response gets
//     {{ .Response }} appended;
//   - the chat handler: the Modelfile's SYSTEM becomes a first system message when the conversation does not
//     start with one; a template that shows .Thinking of the messages it ranges over offers thinking, and then
//     an unset think flag means think = true;
//   - collation: consecutive messages of one role (tools excepted) merge with "\n\n"; .System is every system
//     message joined with "\n\n";
//   - templates that range over .Messages see .System, .Messages (Role, Content, Thinking, ToolCalls, ToolName,
//     ToolCallID), .Tools, .Response = "", .Think, .ThinkLevel, .IsThinkSet;
//   - legacy templates (.System/.Prompt/.Response only) run once per user/assistant exchange, the last time with
//     everything after {{ .Response }} cut away.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"regexp"
	"strconv"
	"strings"
	"text/template"
	"text/template/parse"
	"time"
)

type toolProperty struct {
	AnyOf       []toolProperty  `json:"anyOf,omitempty"`
	Type        propertyType    `json:"type,omitempty"`
	Items       any             `json:"items,omitempty"`
	Description string          `json:"description,omitempty"`
	Enum        []any           `json:"enum,omitempty"`
	Properties  toolPropertyMap `json:"properties,omitempty"`
	Required    []string        `json:"required,omitempty"`
}

// propertyType is JSON Schema's "type": one name or a list of names.
type propertyType []string

func (p *propertyType) UnmarshalJSON(b []byte) error {
	var one string
	if err := json.Unmarshal(b, &one); err == nil {
		*p = propertyType{one}
		return nil
	}
	var many []string
	if err := json.Unmarshal(b, &many); err != nil {
		return err
	}
	*p = many
	return nil
}

func (p propertyType) MarshalJSON() ([]byte, error) {
	if len(p) == 1 {
		return json.Marshal(p[0])
	}
	return json.Marshal([]string(p))
}

// toolPropertyMap prints as JSON inside a template, as Ollama's property maps do.
type toolPropertyMap map[string]toolProperty

func (m toolPropertyMap) String() string {
	if m == nil {
		return "{}"
	}
	b, _ := json.Marshal(m)
	return string(b)
}

type toolFunction struct {
	Name        string `json:"name"`
	Description string `json:"description"`
	Parameters  struct {
		Type       string          `json:"type"`
		Defs       any             `json:"$defs,omitempty"`
		Items      any             `json:"items,omitempty"`
		Required   []string        `json:"required,omitempty"`
		Properties toolPropertyMap `json:"properties"`
	} `json:"parameters"`
}

type tool struct {
	Type     string       `json:"type"`
	Items    any          `json:"items,omitempty"`
	Function toolFunction `json:"function"`
}

func (t tool) String() string {
	b, _ := json.Marshal(t)
	return string(b)
}

type toolList []tool

func (t toolList) String() string {
	b, _ := json.Marshal(t)
	return string(b)
}

// callArguments prints as JSON inside a template ({{ .Function.Arguments }}).
type callArguments map[string]any

func (a callArguments) String() string {
	if a == nil {
		return "{}"
	}
	b, _ := json.Marshal(a)
	return string(b)
}

type toolCall struct {
	ID       string `json:"id"`
	Function struct {
		Index     int           `json:"index"`
		Name      string        `json:"name"`
		Arguments callArguments `json:"arguments"`
	} `json:"function"`
}

// message carries the fields a template can reach on an element of .Messages.
type message struct {
	Role       string     `json:"role"`
	Content    string     `json:"content"`
	Thinking   string     `json:"thinking"`
	Images     []string   `json:"images"`
	ToolCalls  []toolCall `json:"tool_calls"`
	ToolName   string     `json:"tool_name"`
	ToolCallID string     `json:"tool_call_id"`
}

type renderCase struct {
	System     string    `json:"system"`
	Messages   []message `json:"messages"`
	Think      *bool     `json:"think"`
	ThinkLevel string    `json:"think_level"`
	Tools      toolList  `json:"tools"`
}

type job struct {
	Template string       `json:"template"`
	Cases    []renderCase `json:"cases"`
}

type caseResult struct {
	Prompt string `json:"prompt"`
	Error  string `json:"error,omitempty"`
}

type jobResult struct {
	ParseError string       `json:"parse_error,omitempty"`
	ParseLine  int          `json:"parse_line,omitempty"`
	Thinking   bool         `json:"thinking"`
	Tools      bool         `json:"tools"` // the template names .Tools: Ollama offers tool calling
	Results    []caseResult `json:"results"`
}

func typeScriptType(p toolProperty) string {
	if len(p.AnyOf) > 0 {
		parts := make([]string, len(p.AnyOf))
		for i, a := range p.AnyOf {
			parts[i] = typeScriptType(a)
		}
		return strings.Join(parts, " | ")
	}
	names := map[string]string{"string": "string", "number": "number", "integer": "number", "boolean": "boolean",
		"array": "any[]", "object": "Record<string, any>", "null": "null"}
	if len(p.Type) == 0 {
		return "any"
	}
	parts := make([]string, len(p.Type))
	for i, t := range p.Type {
		if n, ok := names[t]; ok {
			parts[i] = n
		} else {
			parts[i] = "any"
		}
	}
	return strings.Join(parts, " | ")
}

var funcs = template.FuncMap{
	"json": func(v any) string {
		b, _ := json.Marshal(v)
		return string(b)
	},
	// Ollama accepts a format argument but always prints YYYY-MM-DD
	"currentDate": func(args ...string) string { return time.Now().Format("2006-01-02") },
	"yesterdayDate": func(args ...string) string {
		return time.Now().AddDate(0, 0, -1).Format("2006-01-02")
	},
	"toTypeScriptType": func(v any) string {
		switch p := v.(type) {
		case toolProperty:
			return typeScriptType(p)
		case *toolProperty:
			if p != nil {
				return typeScriptType(*p)
			}
		}
		return "any"
	},
}

// names collects every field and variable name a template mentions, lower-cased, the way Ollama decides
// between its Messages form and its legacy form.
func names(n parse.Node, into map[string]bool) error {
	switch n := n.(type) {
	case *parse.ListNode:
		for _, c := range n.Nodes {
			if err := names(c, into); err != nil {
				return err
			}
		}
	case *parse.ActionNode:
		if n.Pipe == nil {
			return fmt.Errorf("undefined action in template")
		}
		return names(n.Pipe, into)
	case *parse.TemplateNode:
		if n.Pipe == nil {
			return fmt.Errorf("undefined template specified")
		}
		return names(n.Pipe, into)
	case *parse.IfNode:
		return branchNames(&n.BranchNode, into)
	case *parse.RangeNode:
		return branchNames(&n.BranchNode, into)
	case *parse.WithNode:
		return branchNames(&n.BranchNode, into)
	case *parse.PipeNode:
		for _, c := range n.Cmds {
			for _, a := range c.Args {
				if err := names(a, into); err != nil {
					return err
				}
			}
		}
	case *parse.FieldNode:
		for _, s := range n.Ident {
			into[strings.ToLower(s)] = true
		}
	case *parse.VariableNode:
		for _, s := range n.Ident {
			into[strings.ToLower(s)] = true
		}
	}
	return nil
}

func branchNames(b *parse.BranchNode, into map[string]bool) error {
	if b.Pipe == nil {
		return fmt.Errorf("undefined branch")
	}
	if err := names(b.Pipe, into); err != nil {
		return err
	}
	for _, l := range []*parse.ListNode{b.List, b.ElseList} {
		if l != nil {
			if err := names(l, into); err != nil {
				return err
			}
		}
	}
	return nil
}

func templateNames(t *template.Template) (map[string]bool, error) {
	into := map[string]bool{}
	for _, tt := range t.Templates() {
		if tt.Tree == nil {
			continue
		}
		if err := names(tt.Tree.Root, into); err != nil {
			return nil, err
		}
	}
	return into, nil
}

var lineOf = regexp.MustCompile(`^template: [^:]*:(\d+):`)

func parseTemplate(text string) (*template.Template, map[string]bool, error) {
	t, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(text)
	if err != nil {
		return nil, nil, err
	}
	vars, err := templateNames(t)
	if err != nil {
		return nil, nil, err
	}
	if !vars["messages"] && !vars["response"] {
		// Ollama appends {{ .Response }} to a template that would otherwise never show the answer
		response := &parse.ActionNode{NodeType: parse.NodeAction, Pipe: &parse.PipeNode{NodeType: parse.NodePipe,
			Cmds: []*parse.CommandNode{{NodeType: parse.NodeCommand,
				Args: []parse.Node{&parse.FieldNode{NodeType: parse.NodeField, Ident: []string{"Response"}}}}}}}
		t.Tree.Root.Nodes = append(t.Tree.Root.Nodes, response)
		vars["response"] = true
	}
	return t, vars, nil
}

// offersThinking: the template shows {{ .Thinking }} inside a range over .Messages, in a block that starts and ends
// with text (the thinking tags). Ollama grants such a model the thinking capability and then defaults think to true.
func offersThinking(t *template.Template) bool {
	opening, closing := "", ""
	var ancestors []parse.Node
	var visit func(n parse.Node)
	visit = func(n parse.Node) {
		if n == nil {
			return
		}
		ancestors = append(ancestors, n)
		defer func() { ancestors = ancestors[:len(ancestors)-1] }()
		switch x := n.(type) {
		case *parse.FieldNode:
			if len(x.Ident) > 0 && x.Ident[0] == "Thinking" && insideMessagesRange(ancestors) {
				for i := len(ancestors) - 1; i >= 0; i-- {
					if l, ok := ancestors[i].(*parse.ListNode); ok {
						if first, ok := l.Nodes[0].(*parse.TextNode); ok {
							opening = strings.TrimSpace(string(first.Text))
						}
						if last, ok := l.Nodes[len(l.Nodes)-1].(*parse.TextNode); ok {
							closing = strings.TrimSpace(string(last.Text))
						}
						break
					}
				}
			}
		case *parse.ListNode:
			for _, c := range x.Nodes {
				visit(c)
			}
		case *parse.IfNode:
			visitBranch(&x.BranchNode, visit)
		case *parse.RangeNode:
			visitBranch(&x.BranchNode, visit)
		case *parse.WithNode:
			visitBranch(&x.BranchNode, visit)
		case *parse.ActionNode:
			visit(x.Pipe)
		case *parse.TemplateNode:
			if x.Pipe != nil {
				visit(x.Pipe)
			}
		case *parse.PipeNode:
			for _, c := range x.Cmds {
				visit(c)
			}
		case *parse.CommandNode:
			for _, a := range x.Args {
				visit(a)
			}
		}
	}
	visit(t.Tree.Root)
	return opening != "" && closing != ""
}

func visitBranch(b *parse.BranchNode, visit func(parse.Node)) {
	if b.Pipe != nil {
		visit(b.Pipe)
	}
	if b.List != nil {
		visit(b.List)
	}
	if b.ElseList != nil {
		visit(b.ElseList)
	}
}

// insideMessagesRange: the nearest enclosing range iterates over a pipeline that names the field Messages.
func insideMessagesRange(ancestors []parse.Node) bool {
	for i := len(ancestors) - 1; i >= 0; i-- {
		if r, ok := ancestors[i].(*parse.RangeNode); ok {
			return namesField(r.Pipe, "Messages")
		}
	}
	return false
}

func namesField(n parse.Node, field string) bool {
	switch x := n.(type) {
	case *parse.FieldNode:
		return len(x.Ident) > 0 && x.Ident[0] == field
	case *parse.PipeNode:
		for _, c := range x.Cmds {
			if namesField(c, field) {
				return true
			}
		}
	case *parse.CommandNode:
		for _, a := range x.Args {
			if namesField(a, field) {
				return true
			}
		}
	}
	return false
}

// collate merges consecutive messages of one role (tool results stay apart) and joins all system texts.
func collate(msgs []message) (string, []*message) {
	var system []string
	var out []*message
	for i := range msgs {
		m := msgs[i]
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if len(out) > 0 && out[len(out)-1].Role == m.Role && m.Role != "tool" {
			out[len(out)-1].Content += "\n\n" + m.Content
		} else {
			out = append(out, &m)
		}
	}
	return strings.Join(system, "\n\n"), out
}

// cutAfterResponse keeps a copy of the template up to and including its first {{ .Response }}: the last exchange of
// a legacy template ends where the model's answer begins.
func cutAfterResponse(root *parse.ListNode) *parse.ListNode {
	cut := false
	var walk func(n parse.Node) parse.Node
	walkList := func(l *parse.ListNode) *parse.ListNode {
		if l == nil {
			return nil
		}
		kept := []parse.Node{}
		for _, c := range l.Nodes {
			if cut {
				break
			}
			if k := walk(c); k != nil {
				kept = append(kept, k)
			}
		}
		l.Nodes = kept
		return l
	}
	walk = func(n parse.Node) parse.Node {
		switch n := n.(type) {
		case *parse.FieldNode:
			for _, s := range n.Ident {
				if s == "Response" {
					cut = true
				}
			}
			return n
		case *parse.ListNode:
			return walkList(n)
		case *parse.IfNode:
			n.List, n.ElseList = walkList(n.List), walkElse(n.ElseList, &cut, walkList)
		case *parse.RangeNode:
			n.List, n.ElseList = walkList(n.List), walkElse(n.ElseList, &cut, walkList)
		case *parse.WithNode:
			n.List, n.ElseList = walkList(n.List), walkElse(n.ElseList, &cut, walkList)
		case *parse.ActionNode:
			for _, c := range n.Pipe.Cmds {
				args := []parse.Node{}
				for _, a := range c.Args {
					if cut {
						break
					}
					args = append(args, walk(a))
				}
				c.Args = args
			}
		}
		return n
	}
	return walkList(root.CopyList())
}

func walkElse(l *parse.ListNode, cut *bool, walkList func(*parse.ListNode) *parse.ListNode) *parse.ListNode {
	if l == nil {
		return nil
	}
	if *cut {
		return &parse.ListNode{NodeType: parse.NodeList}
	}
	return walkList(l)
}

func execute(t *template.Template, vars map[string]bool, thinking bool, c renderCase) (string, error) {
	msgs := append([]message(nil), c.Messages...)
	if c.System != "" && (len(msgs) == 0 || msgs[0].Role != "system") {
		msgs = append([]message{{Role: "system", Content: c.System}}, msgs...)
	}
	system, collated := collate(msgs)
	if c.Think == nil && thinking {
		yes := true
		c.Think = &yes
	}
	think := c.Think != nil && *c.Think
	level := c.ThinkLevel
	if think && level == "" {
		level = "medium" // what Ollama passes for a plain "think": true
	}
	var b bytes.Buffer
	if vars["messages"] {
		var tools toolList
		if len(c.Tools) > 0 {
			tools = c.Tools
		}
		err := t.Execute(&b, map[string]any{"System": system, "Messages": collated, "Tools": tools,
			"Response": "", "Think": think, "ThinkLevel": level, "IsThinkSet": c.Think != nil})
		return b.String(), err
	}
	values := func(system, prompt, response string) map[string]any {
		return map[string]any{"System": system, "Prompt": prompt, "Response": response, "Think": think,
			"ThinkLevel": level, "IsThinkSet": c.Think != nil}
	}
	system = ""
	prompt, response := "", ""
	flush := func() error {
		err := t.Execute(&b, values(system, prompt, response))
		system, prompt, response = "", "", ""
		return err
	}
	for _, m := range collated {
		switch m.Role {
		case "system":
			if prompt != "" || response != "" {
				if err := flush(); err != nil {
					return b.String(), err
				}
			}
			system = m.Content
		case "user":
			if response != "" {
				if err := flush(); err != nil {
					return b.String(), err
				}
			}
			prompt = m.Content
		case "assistant":
			response = m.Content
		}
	}
	// as in Ollama, the cut copy is a bare template: no extra functions, default missingkey
	last, err := template.New("").AddParseTree("", &parse.Tree{Root: cutAfterResponse(t.Tree.Root)})
	if err != nil {
		return b.String(), err
	}
	err = last.Execute(&b, values(system, prompt, response))
	return b.String(), err
}

func run(j job) jobResult {
	res := jobResult{Results: []caseResult{}}
	t, vars, err := parseTemplate(j.Template)
	if err != nil {
		res.ParseError = err.Error()
		if m := lineOf.FindStringSubmatch(err.Error()); m != nil {
			res.ParseLine, _ = strconv.Atoi(m[1])
		}
		return res
	}
	res.Thinking = offersThinking(t)
	res.Tools = vars["tools"]
	for _, c := range j.Cases {
		prompt, err := execute(t, vars, res.Thinking, c)
		r := caseResult{Prompt: prompt}
		if err != nil {
			r.Error = err.Error()
		}
		res.Results = append(res.Results, r)
	}
	return res
}

func main() {
	var in struct {
		Jobs []job `json:"jobs"`
	}
	if err := json.NewDecoder(bufio.NewReader(os.Stdin)).Decode(&in); err != nil {
		fmt.Fprintln(os.Stderr, "ollama_render: bad input:", err)
		os.Exit(2)
	}
	out := struct {
		Jobs []jobResult `json:"jobs"`
	}{Jobs: []jobResult{}}
	for _, j := range in.Jobs {
		out.Jobs = append(out.Jobs, run(j))
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(out); err != nil {
		fmt.Fprintln(os.Stderr, "ollama_render:", err)
		os.Exit(1)
	}
}
